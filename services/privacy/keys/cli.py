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
``kept_versions``, ``resumed``, ``incomplete_purges``: the stores whose purge of the old
ciphertexts did not finish — the rotation completed all the same); a refusal or no answer exits 2 (run it again: a rotation
left under way is resumed, not begun anew). ``hearth keys rotate-households
--older-than-days N [--limit M] [--request-id ID] [--no-wait]`` does it for up to M (100; at
most 1000) households whose newest key is older than N days, oldest first, as a durable job
of the privacy service (``POST /v1/keys/rotate-households`` → 202): it waits for the job
and prints it (each household's outcome, ``counts``), exit 0 when completed, 1 when a
household failed, 2 refused or not finished within ``--wait-s`` (the job goes on);
``--no-wait`` prints the accepted job and exits 0.

Only ``argparse`` is imported here: the HTTP client is imported when the command runs,
so registering it costs the ``hearth`` command nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

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


EXIT_JOB_FAILED = 1
TERMINAL = ("completed", "failed")


def _cmd_rotate_households(args: argparse.Namespace) -> int:
    """POST the batch (202: a job), then — unless ``--no-wait`` — read its state every
    ``--poll-s`` until it is completed or failed, and print it. A privacy before session
    27 (rolling upgrade) runs the batch inside the call: its answer (200) is printed as is."""
    import httpx

    from services.rollout import _experiment, _json_or_raise

    body = {"older_than_days": args.older_than_days, "limit": args.limit}
    if args.request_id:
        body["request_id"] = args.request_id
    experiment = _experiment(args)   # ValueError (exit 2) without HEARTH_ROLLOUT_API_KEY
    try:
        try:
            response = experiment._http.post("/v1/keys/rotate-households", json=body, timeout=args.timeout_s)
            job = _json_or_raise(response)
            if response.status_code != 202 or args.no_wait:
                print(json.dumps(job, sort_keys=True))
                return 0
            deadline = time.monotonic() + args.wait_s
            while job["state"] not in TERMINAL:
                if time.monotonic() > deadline:
                    print(json.dumps(job, sort_keys=True))
                    print(f"error: batch rotation {job['job_id']} still {job['state']} after {args.wait_s:.0f} s "
                          f"({job['counts']}); it goes on in the privacy service: follow it with "
                          f"GET /v1/keys/rotate-households/{job['job_id']}", file=sys.stderr)
                    return EXIT_REFUSED
                time.sleep(args.poll_s)
                job = _json_or_raise(experiment._http.get(f"/v1/keys/rotate-households/{job['job_id']}",
                                                          timeout=args.timeout_s))
        except ValueError as exc:   # the gateway's refusal, with its error body
            print(f"error: key rotation refused: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        except httpx.HTTPError as exc:   # unreachable, TLS, timeout
            print(f"error: no answer from the gateway at {args.gateway}: {type(exc).__name__}: {exc} (run it again "
                  "with the same --request-id: the same job is answered, none is begun twice)", file=sys.stderr)
            return EXIT_REFUSED
    finally:
        experiment.close()
    print(json.dumps(job, sort_keys=True))
    return 0 if job["state"] == "completed" else EXIT_JOB_FAILED


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
    batch.add_argument("--request-id", default="", help="idempotency key: run again with the same id, the same job "
                                                        "is answered (none begun twice)")
    batch.add_argument("--no-wait", action="store_true", help="print the job as accepted and exit; follow it with "
                                                              "GET /v1/keys/rotate-households/{job_id}")
    batch.add_argument("--wait-s", type=float, default=3600.0, help="how long to wait for the job to finish "
                                                                     "(exit 2 past it; the job goes on)")
    batch.add_argument("--poll-s", type=float, default=2.0, help="how often to read the job's state")
    batch.add_argument("--timeout-s", type=float, default=330.0,
                       help="each HTTP call's timeout (a privacy before session 27 runs the batch inside the call: "
                            "its gateway allowed 300 s)")
    batch.set_defaults(func=_cmd_rotate_households)
