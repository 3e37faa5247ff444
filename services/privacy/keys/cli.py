"""``hearth keys rotate --to KEK_ID``: the KEK rotation step of docs/privacy.md ("KEK
rotation") as an operator command — privacy's ``RotateKeys`` through the gateway
(``POST /v1/keys/rotate``, admin only), so the call carries the operator's own
credentials: the gateway authenticates the API key, the privacy service checks the
permission again and audits it (``key_rotation``, principal = the key's owner).

    HEARTH_ROLLOUT_API_KEY=hk_... hearth keys rotate --to k2 [--gateway URL]

The gateway key (role admin) comes from ``HEARTH_ROLLOUT_API_KEY`` and the CA of the
gateway's HTTPS certificate from ``HEARTH_ROLLOUT_CA_FILE``, as for the other operator
commands (``hearth rollout``, ``hearth calibrator``). Prints the answer as JSON
(``rewrapped``, ``active_kek_id``, ``kek_ids_in_use``) and exits 0; a refusal (wrong
key, not an admin, a KEK id the privacy service does not have) prints the gateway's
answer on stderr and exits 2.

``hearth keys rotate-household ACCOUNT_ID`` rotates one household's data key (privacy's
``RotateDataKey`` through ``POST /v1/household/{id}/rotate-key``; privacy officer or admin,
audited ``key_rotation``): docs/operations.md, "Rotating a household's data key". It prints
the answer as JSON (``dek_version``, ``reencrypted``, ``destroyed_versions``,
``kept_versions``, ``resumed``); a refusal or no answer exits 2 (run it again: a rotation
left under way is resumed, not begun anew). ``hearth keys rotate-households
--older-than-days N [--limit M]`` does it for up to M (100; at most 1000) households whose
newest key is older than N days, oldest first.

Only ``argparse`` is imported here: the HTTP client is imported when the command runs,
so registering it costs the ``hearth`` command nothing.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_REFUSED = 2


def _post(args: argparse.Namespace, path: str, body: dict | None, rpc: str) -> int:
    import httpx

    from services.rollout import _experiment, _json_or_raise

    experiment = _experiment(args)   # ValueError (exit 2) without HEARTH_ROLLOUT_API_KEY
    try:
        try:
            answer = _json_or_raise(experiment._http.post(path, json=body, timeout=args.timeout_s))
        except ValueError as exc:   # the gateway's refusal, with its error body
            print(f"error: key rotation refused: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        except httpx.HTTPError as exc:   # unreachable, TLS, timeout: nothing is known to have happened
            print(f"error: no answer from the gateway at {args.gateway}: {type(exc).__name__}: {exc} "
                  f"({rpc} is idempotent: run it again)", file=sys.stderr)
            return EXIT_REFUSED
    finally:
        experiment.close()
    print(json.dumps(answer, sort_keys=True))
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    return _post(args, "/v1/keys/rotate", {"new_active_kek_id": args.to}, "RotateKeys")


def _cmd_rotate_households(args: argparse.Namespace) -> int:
    return _post(args, "/v1/keys/rotate-households",
                 {"older_than_days": args.older_than_days, "limit": args.limit}, "RotateDataKeys")


def _cmd_rotate_household(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    return _post(args, f"/v1/household/{quote(args.account_id, safe='')}/rotate-key", None, "RotateDataKey")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``keys rotate`` to an argparse sub-command set (the ``hearth`` CLI)."""
    keys = subparsers.add_parser("keys", help="household data keys (privacy service)")
    commands = keys.add_subparsers(dest="keys_command", required=True)
    rotate = commands.add_parser(
        "rotate", help="make another configured KEK active and re-wrap every data key under it (admin)")
    rotate.add_argument("--to", required=True, metavar="KEK_ID",
                        help="the KEK id (of HEARTH_KEKS on every privacy replica) to make active")
    rotate.add_argument("--gateway", default="http://127.0.0.1:8080")
    rotate.add_argument("--timeout-s", type=float, default=330.0,
                        help="how long to wait for the answer (the gateway allows RotateKeys 300 s)")
    rotate.set_defaults(func=_cmd_rotate)
    household = commands.add_parser(
        "rotate-household", help="rotate one household's data key: new version, its data re-encrypted in every "
                                 "store, the old version destroyed (privacy officer or admin)")
    household.add_argument("account_id", metavar="ACCOUNT_ID")
    household.add_argument("--gateway", default="http://127.0.0.1:8080")
    household.add_argument("--timeout-s", type=float, default=330.0,
                           help="how long to wait for the answer (a rotation waits ~70 s before re-encrypting; "
                                "the gateway allows it 300 s)")
    household.set_defaults(func=_cmd_rotate_household)
    batch = commands.add_parser(
        "rotate-households", help="rotate the data key of up to --limit households whose key is older than "
                                  "--older-than-days (privacy officer or admin)")
    batch.add_argument("--older-than-days", type=float, required=True)
    batch.add_argument("--limit", type=int, default=100, help="at most this many households (1..1000)")
    batch.add_argument("--gateway", default="http://127.0.0.1:8080")
    batch.add_argument("--timeout-s", type=float, default=330.0,
                       help="how long to wait for the answer (the gateway allows it 300 s: keep --limit small "
                            "enough for that)")
    batch.set_defaults(func=_cmd_rotate_households)
