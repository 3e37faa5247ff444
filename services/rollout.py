"""Guarded rollout of a challenger model variant, and automatic rollback.

Both act through the gateway's experiment API (``PUT /v1/experiment``), so every step is
a flag change that the feedback service stores and audits (event ``flag_change`` in the
audit log, with the reason given here) and that every replica reads.

* ``hearth rollout run --challenger V --steps 5,25,50,100``: moves V through the traffic
  percentages, holding each step ``--hold-s`` seconds and checking the guards every
  ``--check-s``. When a guard stays crossed for ``--sustain-s`` (the rules' ``for:``),
  it turns the kill switch on (everyone back to control) and exits 3.
* ``hearth calibrator list|rollback|release --variant V``: the calibrator versions of a
  variant; put an earlier one in force (``--to N``, default the previous version; 0 =
  identity) and hold automatic refits; release the hold (services/feedback/calibrator_choice.py).
* ``hearth rollout webhook --listen HOST:PORT``: an Alertmanager-compatible webhook
  receiver (``POST /alerts``, Alertmanager's JSON payload). A *firing* alert labelled
  ``action="rollback"`` (the `hearth-rollback` rules: p99 > 150 ms for 5 m, errors
  > 0.5 % for 2 m, accuracy < 65 %) turns the kill switch on with the alert as reason.

Guards (the report's rollback triggers):
  accuracy   challenger accuracy < 0.65 on >= --min-samples labelled predictions
             (GET /v1/experiment: the feedback service's own figure)
  latency    gateway p99 > 0.15 s          (PromQL, with --prometheus)
  errors     gateway 5xx ratio > 0.005     (PromQL, with --prometheus)

The gateway key (role admin) comes from HEARTH_ROLLOUT_API_KEY; the webhook's bearer
token, when set, from HEARTH_ROLLOUT_WEBHOOK_TOKEN (Alertmanager's
``http_config.authorization.credentials``); HEARTH_ROLLOUT_CA_FILE names the CA that
signed the gateway's HTTPS certificate when it is not in the system's trust store.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import ssl
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from services.common import strict_json

log = logging.getLogger("hearth.rollout")

ACCURACY_FLOOR = 0.65
P99_CEILING_S = 0.15
ERROR_CEILING = 0.005
LATENCY_QUERY = ('histogram_quantile(0.99, sum by (le) (rate(hearth_http_request_duration_seconds_bucket'
                 '{route!~"/v1/attribution|/v1/household/\\\\{account_id\\\\}/export|/v1/audit/export|/health|/metrics|unmatched"}[5m])))')
ERROR_QUERY = ('sum(rate(hearth_http_requests_total{status=~"5.."}[2m])) '
               '/ sum(rate(hearth_http_requests_total[2m]))')
EXIT_ROLLED_BACK = 3
# The webhook serves a thread per connection, and any pod may connect when
# rolloutWebhook.from is [] (the chart's default, with the token): a connection may wait
# this long (each read or write, and the whole connection), and a body be this large.
# Alertmanager sends a group's alerts in one small JSON body (kilobytes); until attack30
# an idle connection held its thread for ever and a body was read as long as its
# Content-Length said.
WEBHOOK_IO_TIMEOUT_S = 10.0
WEBHOOK_MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class Breach:
    guard: str
    value: float
    limit: float

    def reason(self, challenger: str) -> str:
        return f"automatic rollback of {challenger}: {self.guard} {self.value:.4g} crosses {self.limit:g}"


class Experiment:
    """The experiment API of the gateway."""

    def __init__(self, gateway: str, api_key: str, timeout_s: float = 10.0, ca_file: str | None = None) -> None:
        # ca_file: the CA of a gateway serving HTTPS with a private certificate (the
        # chart mounts the https Secret's ca.crt); None: the system's trust store.
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self._http = httpx.Client(base_url=gateway, headers={"X-API-Key": api_key}, timeout=timeout_s,
                                  verify=verify)

    def get(self) -> dict:
        r = self._http.get("/v1/experiment")
        r.raise_for_status()
        return r.json()

    def set_split(self, control: str, challenger: str, percent: float, reason: str) -> int:
        # The split always names control, at 0 % for a full rollout: the experiment API
        # refuses a split without it (422 `traffic`), so until session 21 the 100 % step of
        # the documented `--steps 5,25,50,100` failed and the command stopped with a traceback.
        traffic = {control: round(100.0 - percent, 2), challenger: percent}
        r = self._http.put("/v1/experiment", json={"traffic": traffic, "kill_switch": False, "reason": reason})
        r.raise_for_status()
        return r.json()["version"]

    def kill(self, reason: str) -> int:
        r = self._http.put("/v1/experiment", json={"traffic": {}, "kill_switch": True, "reason": reason[:500]})
        r.raise_for_status()
        return r.json()["version"]

    def close(self) -> None:
        self._http.close()


class Calibrators:
    """The calibrator API of the gateway (``/v1/calibrators/{variant}``)."""

    def __init__(self, experiment: Experiment) -> None:
        self._http = experiment._http

    def list(self, variant: str) -> dict:
        return _json_or_raise(self._http.get(f"/v1/calibrators/{variant}"))

    def activate(self, variant: str, version: int, hold: bool, reason: str) -> dict:
        return _json_or_raise(self._http.put(f"/v1/calibrators/{variant}",
                                             json={"version": version, "hold": hold, "reason": reason[:500]}))


def _json_or_raise(response: httpx.Response) -> dict:
    if response.is_error:
        try:
            detail = response.json()
        except ValueError:
            detail = response.text[:300]
        raise ValueError(f"gateway answered {response.status_code}: {detail}")
    return response.json()


def rollback_target(listing: dict) -> int:
    """The version a rollback goes to when none is named: the newest stored version
    older than the one in force; 0 (identity) when the one in force is the oldest."""
    current = int(listing["current_version"])
    if current == 0:
        raise ValueError(f"variant {listing['variant']!r} has no calibrator in force: nothing to roll back")
    older = [int(v["version"]) for v in listing["versions"] if int(v["version"]) < current]
    return max(older, default=0)


# An instant query's answer is a few hundred bytes. httpx inflates a gzip body and reads
# a body of any length: whatever answered at the Prometheus address could send 64 MiB of
# zeros as 64 KB of gzip, inflated whole by the guard (the webhook pod has 128 MiB) before
# the parse failed (attack31). At most this much is read, decompressed.
PROMETHEUS_MAX_ANSWER_BYTES = 1 << 20


def _bounded_body(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    for chunk in response.iter_bytes():   # decoded (inflated) a piece at a time
        body += chunk
        if len(body) > limit:
            raise RuntimeError(f"{response.url.host}: the answer is more than {limit} bytes (decompressed): "
                               "not read further")
    return bytes(body)


def prometheus_value(url: str, query: str) -> float | None:
    with httpx.stream("GET", url.rstrip("/") + "/api/v1/query", params={"query": query}, timeout=10) as r:
        raw = _bounded_body(r, PROMETHEUS_MAX_ANSWER_BYTES)
    try:
        body = strict_json.loads(raw)
    except ValueError:
        raise RuntimeError(f"prometheus answered {query!r} with {r.status_code} and no JSON") from None
    if r.status_code != 200 or not isinstance(body, dict) or body.get("status") != "success":
        raise RuntimeError(f"prometheus refused {query!r}: {body}")
    result = body["data"]["result"]
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if value != value else value   # NaN: no traffic


def check_guards(experiment: dict, challenger: str, min_samples: int,
                 prometheus: str | None) -> list[Breach]:
    """The rollback triggers crossed right now (pure apart from the Prometheus reads)."""
    breaches = []
    for result in experiment.get("results", []):
        if result["variant"] == challenger and result["n"] >= min_samples and result["accuracy"] < ACCURACY_FLOOR:
            breaches.append(Breach("accuracy", result["accuracy"], ACCURACY_FLOOR))
    if prometheus:
        p99 = prometheus_value(prometheus, LATENCY_QUERY)
        if p99 is not None and p99 > P99_CEILING_S:
            breaches.append(Breach("p99 latency (s)", p99, P99_CEILING_S))
        errors = prometheus_value(prometheus, ERROR_QUERY)
        if errors is not None and errors > ERROR_CEILING:
            breaches.append(Breach("5xx ratio", errors, ERROR_CEILING))
    return breaches


def run_rollout(experiment: Experiment, control: str, challenger: str, steps: list[float], *,
                hold_s: float, check_s: float, sustain_s: float, min_samples: int,
                prometheus: str | None, sleep: Callable[[float], None] = time.sleep,
                clock: Callable[[], float] = time.monotonic) -> dict:
    """Walk the steps; roll back on a sustained breach. Returns what happened."""
    done: list[float] = []
    for i, percent in enumerate(steps, 1):
        version = experiment.set_split(control, challenger, percent,
                                       f"rollout step {i}/{len(steps)}: {challenger} at {percent:g}%")
        log.info("step", extra={"fields": {"challenger": challenger, "percent": percent, "version": version}})
        done.append(percent)
        step_end = clock() + hold_s
        breached_since: float | None = None
        while True:
            breaches = check_guards(experiment.get(), challenger, min_samples, prometheus)
            now = clock()
            if breaches:
                breached_since = breached_since if breached_since is not None else now
                if now - breached_since >= sustain_s:
                    reason = "; ".join(b.reason(challenger) for b in breaches)
                    version = experiment.kill(reason)
                    log.warning("rolled back", extra={"fields": {"reason": reason, "version": version}})
                    return {"outcome": "rolled_back", "steps": done, "reason": reason, "version": version}
            else:
                breached_since = None
            if now >= step_end:
                break
            sleep(check_s)
    return {"outcome": "completed", "steps": done}


# ---- Alertmanager webhook -----------------------------------------------------------------

def rollback_reason(payload: dict) -> str | None:
    """The reason to roll back for an Alertmanager webhook payload, or None: only firing
    alerts labelled action=rollback count (a resolved one never re-enables anything)."""
    alerts = payload.get("alerts", [])
    if not isinstance(alerts, list):
        raise ValueError("alerts: must be a list")
    for i, alert in enumerate(alerts):
        for name in ("labels", "annotations"):
            if isinstance(alert, dict) and not isinstance(alert.get(name) or {}, dict):
                raise ValueError(f"alerts[{i}].{name}: must be an object")
    firing = [a for a in alerts if isinstance(a, dict) and a.get("status") == "firing"
              and (a.get("labels") or {}).get("action") == "rollback"]
    if not firing:
        return None
    names = sorted({str(a["labels"].get("alertname", "?")) for a in firing})
    summary = str((firing[0].get("annotations") or {}).get("summary", ""))[:300]
    return f"alert {', '.join(names)}: {summary}".strip()


def make_webhook(experiment: Experiment, token: str | None) -> type[BaseHTTPRequestHandler]:
    from services.common.telemetry import ConnectionDeadline

    class Handler(ConnectionDeadline, BaseHTTPRequestHandler):
        timeout = WEBHOOK_IO_TIMEOUT_S   # StreamRequestHandler: each read's socket timeout
        connection_deadline_s = WEBHOOK_IO_TIMEOUT_S   # and the whole connection's

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # noqa: N802 - http.server's naming
            if self.path != "/alerts":
                return self._answer(404, {"error": "POST /alerts"})
            if token and not hmac.compare_digest(self.headers.get("authorization", ""), f"Bearer {token}"):
                return self._answer(401, {"error": "bearer token required"})
            try:
                length = int(self.headers.get("content-length", "0"))
            except ValueError:
                length = -1
            if length < 0:
                return self._answer(400, {"error": "content-length: a number of bytes"})
            if length > WEBHOOK_MAX_BODY_BYTES:
                self.close_connection = True   # the body is not read
                return self._answer(413, {"error": f"the body may hold at most {WEBHOOK_MAX_BODY_BYTES} bytes"})
            try:
                payload = strict_json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                return self._answer(400, {"error": "body must be Alertmanager's JSON payload"})
            if not isinstance(payload, dict):
                return self._answer(400, {"error": "body must be a JSON object"})
            try:
                reason = rollback_reason(payload)
            except ValueError as exc:   # until attack30 a traceback, the connection dropped unanswered
                return self._answer(400, {"error": str(exc)})
            if reason is None:
                return self._answer(200, {"action": "none"})
            try:
                version = experiment.kill(reason)
            except httpx.HTTPError as exc:
                log.error("rollback failed: %s", exc)
                return self._answer(502, {"error": "the kill switch could not be set; Alertmanager retries"})
            log.warning("rolled back by alert", extra={"fields": {"reason": reason, "version": version}})
            return self._answer(200, {"action": "rolled_back", "version": version, "reason": reason})

        def do_GET(self):  # noqa: N802
            return self._answer(200, {"status": "ok"}) if self.path == "/health" else self._answer(404, {})

        def log_message(self, *_args):
            pass

    return Handler


# ---- command line -------------------------------------------------------------------------

def _experiment(args: argparse.Namespace) -> Experiment:
    key = os.environ.get("HEARTH_ROLLOUT_API_KEY", "")
    if not key:
        raise ValueError("HEARTH_ROLLOUT_API_KEY: the gateway API key (admin) is required")
    return Experiment(args.gateway, key, ca_file=os.environ.get("HEARTH_ROLLOUT_CA_FILE") or None)


def _steps(text: str) -> list[float]:
    try:
        steps = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("comma-separated percentages, e.g. 5,25,50,100") from None
    if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(steps):
        raise argparse.ArgumentTypeError("increasing percentages in (0, 100]")
    return steps


@contextmanager
def _gateway_answers(gateway: str):
    """A refusal or no answer from the gateway as the command's error (``hearth`` prints it
    on stderr, exit 2), as ``hearth keys`` does; until session 32 an httpx traceback, exit 1
    (an unknown challenger, a wrong key, a gateway not there)."""
    try:
        yield
    except httpx.HTTPStatusError as exc:
        _json_or_raise(exc.response)
        raise
    except httpx.HTTPError as exc:
        raise ValueError(f"no answer from the gateway at {gateway}: {type(exc).__name__}: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    from services.common import telemetry

    telemetry.setup_telemetry("rollout")
    experiment = _experiment(args)
    try:
        with _gateway_answers(args.gateway):
            result = run_rollout(experiment, args.control, args.challenger, args.steps, hold_s=args.hold_s,
                                 check_s=args.check_s, sustain_s=args.sustain_s, min_samples=args.min_samples,
                                 prometheus=args.prometheus)
    finally:
        experiment.close()
    print(json.dumps(result))
    return EXIT_ROLLED_BACK if result["outcome"] == "rolled_back" else 0


def _webhook(args: argparse.Namespace) -> int:
    from services.common import telemetry

    telemetry.setup_telemetry("rollout-webhook")
    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host or "0.0.0.0", int(port)),
                                 make_webhook(_experiment(args), os.environ.get("HEARTH_ROLLOUT_WEBHOOK_TOKEN")))
    log.info("webhook listening", extra={"fields": {"listen": args.listen}})
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def _calibrator(args: argparse.Namespace) -> int:
    experiment = _experiment(args)
    api = Calibrators(experiment)
    try:
        with _gateway_answers(args.gateway):
            if args.calibrator_command == "list":
                print(json.dumps(api.list(args.variant)))
                return 0
            listing = api.list(args.variant)
            if args.calibrator_command == "rollback":
                target = rollback_target(listing) if args.to is None else args.to
                result = api.activate(args.variant, target, hold=not args.no_hold, reason=args.reason)
            else:  # release: keep the version in force, let automatic refits resume
                result = api.activate(args.variant, int(listing["current_version"]), hold=False,
                                      reason=args.reason)
    finally:
        experiment.close()
    print(json.dumps(result))
    return 0


def _register_calibrator(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    calibrator = subparsers.add_parser("calibrator", help="list calibrator versions, roll back, release refits")
    commands = calibrator.add_subparsers(dest="calibrator_command", required=True)
    listing = commands.add_parser("list", help="stored versions, the one in force, held or not (JSON)")
    rollback = commands.add_parser("rollback", help="put an earlier version in force and hold refits (audited)")
    rollback.add_argument("--to", type=int, help="the version (0 = none, identity); default: the previous one")
    rollback.add_argument("--no-hold", action="store_true",
                          help="let the next scheduled refit replace it (default: hold until released)")
    release = commands.add_parser("release", help="let automatic refits replace the version in force again")
    for command in (listing, rollback, release):
        command.add_argument("--gateway", default="http://127.0.0.1:8080")
        command.add_argument("--variant", required=True)
    for command in (rollback, release):
        command.add_argument("--reason", required=True, help="why (kept in the audit log)")
    calibrator.set_defaults(func=_calibrator)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    _register_calibrator(subparsers)
    rollout = subparsers.add_parser("rollout", help="guarded rollout of a challenger variant, automatic rollback")
    commands = rollout.add_subparsers(dest="rollout_command", required=True)
    run = commands.add_parser("run", help="move a challenger through traffic steps, roll back on a trigger")
    run.add_argument("--gateway", default="http://127.0.0.1:8080")
    run.add_argument("--challenger", required=True)
    run.add_argument("--control", default="gmm", help="the control variant (HEARTH_FEEDBACK_CONTROL_VARIANT)")
    run.add_argument("--steps", type=_steps, default=[5.0, 25.0, 50.0, 100.0])
    run.add_argument("--hold-s", type=float, default=1800.0, help="time at each step")
    run.add_argument("--check-s", type=float, default=30.0, help="time between guard checks")
    run.add_argument("--sustain-s", type=float, default=120.0, help="a breach must last this long")
    run.add_argument("--min-samples", type=int, default=200, help="labelled predictions before accuracy counts")
    run.add_argument("--prometheus", help="Prometheus URL for the latency and error guards")
    run.set_defaults(func=_run)
    hook = commands.add_parser("webhook", help="Alertmanager webhook receiver: action=rollback alerts kill")
    hook.add_argument("--gateway", default="http://127.0.0.1:8080")
    hook.add_argument("--listen", default="0.0.0.0:9095")
    hook.set_defaults(func=_webhook)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m services.rollout")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
