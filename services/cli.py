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
    hearth keys rotate-household ACCOUNT_ID                   (one household's data key: RotateDataKey)
    hearth keys rotate-households --older-than-days N         (a bounded batch: RotateDataKeys)
    hearth db provision-roles                                 (PostgreSQL: a login per service, its schema only)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import importlib

# Each top-level command and the module that registers it (``register(subparsers)``). A
# command imports only its own module: the attribution and backup tools load NumPy, SciPy
# and the storage drivers (0.7 CPU-s for every `hearth` call when all were imported at
# start, 1.3 s wall on a loaded node — the rollout webhook, the ledger CronJob and the
# tests' subprocesses paid it). `hearth --help` and an unknown command still build the
# whole parser, so the listing and the error name every command.
COMMAND_MODULES: dict[str, str] = {
    "attribute": "services.attribution.cli",
    "verify-receipt": "services.privacy.cli",
    "audit": "services.privacy.cli",
    "report": "services.feedback.cli",
    "backup": "services.privacy.backup",
    "restore": "services.privacy.backup",
    "ledger": "services.privacy.backup",
    "rollout": "services.rollout",
    "calibrator": "services.rollout",
    "keys": "services.privacy.keys.cli",
    "db": "services.common.storage.roles",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `hearth` parser: every command, or (``command`` a known one) only the commands
    its module registers."""
    parser = argparse.ArgumentParser(prog="hearth", description="Hearth command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    names = [COMMAND_MODULES[command]] if command in COMMAND_MODULES else dict.fromkeys(COMMAND_MODULES.values())
    for name in names:
        importlib.import_module(name).register(commands)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first argument, when it is not an option (the top
    level has only -h)."""
    return argv[0] if argv and not argv[0].startswith("-") else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command(argv)).parse_args(argv)
    run = getattr(args, "func", None) or getattr(args, "handler")
    try:
        return int(run(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
