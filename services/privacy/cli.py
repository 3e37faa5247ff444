"""Offline verification commands for privacy artefacts.

    python -m services.privacy.cli verify-receipt RECEIPT.json [--public-key FILE]
    python -m services.privacy.cli audit verify EXPORT.jsonl --public-key FILE

Exit status: 0 verified, 1 verification failed (forged, altered, tampered log, or
ambiguous: a JSON key given twice, a receipt whose total_count disagrees with its
services), 2 unusable input (unreadable file, malformed JSON or key). ``register(subparsers)``
adds the same commands to another argparse program (e.g. the ``hearth`` CLI).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from services.common.strict_json import DuplicateKeyError
from services.privacy.audit.domain import AlteredExportError, parse_export, verify_log
from services.privacy.keys.signing import key_id, load_public_key
from services.privacy.deletion.receipts import ReceiptVerificationError, SignedReceipt, verify_receipt

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_BAD_INPUT = 2


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc}") from None


def _cmd_verify_receipt(args: argparse.Namespace) -> int:
    public_key = None
    if args.public_key:
        public_key = load_public_key(_read_text(args.public_key, "--public-key"),
                                     argument="--public-key")
    try:
        # Parsing already verifies: a receipt whose total_count disagrees with its
        # services, or with a key given twice, was altered (exit 1, not 2).
        signed = SignedReceipt.from_json(_read_text(args.receipt, "RECEIPT"))
        receipt = verify_receipt(signed, public_key)
    except ReceiptVerificationError as exc:
        print(f"INVALID receipt: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if public_key is None:
        print(
            "warning: verified with the key embedded in the receipt; this proves integrity "
            f"only. Compare key id {receipt.key_id} with the operator's published key.",
            file=sys.stderr,
        )
    print(
        f"OK receipt {receipt.receipt_id}: job {receipt.job_id}, account {receipt.account_id}, "
        f"scope {receipt.scope.get('kind')}, {receipt.total_count} records deleted "
        f"({', '.join(f'{s}={r.count}' for s, r in sorted(receipt.services.items()))}), "
        f"completed {receipt.completed_at.isoformat()}, signed by key {receipt.key_id}"
    )
    return EXIT_OK


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    public_key = load_public_key(_read_text(args.public_key, "--public-key"),
                                 argument="--public-key")
    try:
        exported = parse_export(_read_text(args.export, "EXPORT").splitlines())
    except (DuplicateKeyError, AlteredExportError) as exc:  # tampered, not unreadable
        print(f"INVALID audit log: {exc}", file=sys.stderr)
        return EXIT_INVALID
    result = verify_log(exported.entries, exported.sth, public_key,
                        chain_hashes=exported.chain_hashes)
    if not result.ok:
        at = "" if result.first_bad_seq is None else f" at seq {result.first_bad_seq}"
        reason = result.reason.value if result.reason else "invalid"
        print(f"INVALID audit log: {reason}{at}: {result.message}", file=sys.stderr)
        return EXIT_INVALID
    sth = exported.sth
    print(
        f"OK audit log: {sth.tree_size} entries, root {sth.root.hex()}, "
        f"signed {sth.timestamp.isoformat()} by key {key_id(public_key)}"
    )
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``verify-receipt`` and ``audit verify`` to an argparse sub-command set."""
    receipt = subparsers.add_parser(
        "verify-receipt", help="verify a signed deletion receipt offline"
    )
    receipt.add_argument("receipt", metavar="RECEIPT", help="receipt JSON file")
    receipt.add_argument(
        "--public-key", metavar="FILE",
        help="Ed25519 public key (PEM or raw base64); default: the key embedded in the "
             "receipt, which proves integrity but not who signed",
    )
    receipt.set_defaults(func=_cmd_verify_receipt)

    audit = subparsers.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify", help="verify an exported audit log against its signed tree head"
    )
    verify.add_argument("export", metavar="EXPORT.jsonl", help="exported audit log")
    verify.add_argument("--public-key", metavar="FILE", required=True,
                        help="Ed25519 public key of the log (PEM or raw base64)")
    verify.set_defaults(func=_cmd_audit_verify)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.privacy.cli", description="Hearth privacy verification tools"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
