"""The `hearth` command: one entry point over each service's command-line tools.

    hearth attribute PATHS.csv [--order K] [--method ...]     (attribution)
    hearth verify-receipt RECEIPT [--public-key FILE]         (privacy)
    hearth audit verify EXPORT.jsonl --public-key FILE        (privacy)
    hearth report calibration --input X.jsonl --output DIR    (feedback)
    hearth backup --out DIR [--keep N]                        (every database, online)
    hearth restore SNAPSHOT                                   (deletions since are re-applied)
    hearth rollout run --challenger V --steps 5,25,50,100     (guarded, automatic rollback)
    hearth rollout webhook --listen :9095                     (Alertmanager -> kill switch)
    hearth calibrator rollback --variant V --reason WHY       (earlier calibrator, refits held)
    hearth keys rotate --to KEK_ID                            (KEK rotation: privacy's RotateKeys)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from services.attribution import cli as attribution_cli
from services.feedback import cli as feedback_cli
from services import rollout as rollout_cli
from services.privacy import backup as backup_cli
from services.privacy import cli as privacy_cli
from services.privacy.keys import cli as keys_cli   # argparse only: the command imports its client when run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hearth", description="Hearth command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (attribution_cli, privacy_cli, feedback_cli, backup_cli, rollout_cli, keys_cli):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = getattr(args, "func", None) or getattr(args, "handler")
    try:
        return int(run(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
