"""Slow senders against the real gateway: a body trickled byte by byte must not take
the admission slots other callers need, and is cut off after HEARTH_BODY_TIMEOUT_S
(session 18: forty anonymous connections with one byte of body each turned every
clustering route into 503 for as long as they stayed open)."""

from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from services.common.identity import Role
from tests.security.conftest import _wait

MAX_IN_FLIGHT, MAX_QUEUE, BODY_TIMEOUT_S, HEAD_TIMEOUT_S = 2, 2, 3, 2


@pytest.fixture(scope="module")
def tight_gateway(security_mesh):
    """A gateway replica of the security mesh with 2 slots and 2 queue places per
    service, a 3 s body deadline and a 2 s head deadline."""
    mesh = security_mesh.mesh
    name = "gateway-slow-senders"
    spec = {"max_in_flight": MAX_IN_FLIGHT, "max_queue": MAX_QUEUE, "queue_timeout_s": 0.5}
    port = mesh.spawn_on_free_ports(name, "gateway", {**mesh.env(), "HEARTH_ADMISSION_DEFAULT": json.dumps(spec),
                                                      "HEARTH_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
                                                      "HEARTH_HEAD_TIMEOUT_S": str(HEAD_TIMEOUT_S)},
                                    ("HEARTH_GATEWAY_PORT",))["HEARTH_GATEWAY_PORT"]
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, mesh.processes[name])
        yield port, url
    finally:
        mesh.stop_process(name)


def _slow_body(port: int) -> socket.socket:
    """Headers of an anonymous POST /v1/events announcing 1000 bytes, then one byte."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n{")
    return s


def test_slow_bodies_hold_no_admission_slot(tight_gateway, security_mesh):
    port, url = tight_gateway
    held = [_slow_body(port) for _ in range(3 * (MAX_IN_FLIGHT + MAX_QUEUE))]
    try:
        time.sleep(0.5)
        admin = {"X-API-Key": security_mesh.role_keys[Role.ADMIN]}
        for _ in range(3):
            r = httpx.get(f"{url}/v1/household/slow-senders-acc", headers=admin, timeout=15)
            assert r.status_code in (200, 404), (r.status_code, r.text)
            r = httpx.post(f"{url}/v1/events", headers=admin, json={"events": []}, timeout=15)
            assert r.status_code != 503, r.text
    finally:
        for s in held:
            s.close()


def test_a_body_not_received_in_time_is_408_and_the_connection_closed(tight_gateway):
    port, _ = tight_gateway
    s = _slow_body(port)
    try:
        started = time.monotonic()
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        elapsed = time.monotonic() - started
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data[:200]
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert BODY_TIMEOUT_S - 0.5 <= elapsed < BODY_TIMEOUT_S + 10


def _read_until_closed(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        data += chunk
    return data


def test_an_endless_request_head_is_431_and_the_connection_closed(security_mesh):
    """Until session 18 the gateway buffered header lines without bound (200 MB of
    headers on one anonymous connection: ~195 MB more memory in the gateway)."""
    port = int(security_mesh.url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        s.sendall(b"GET /v1/household/acc-1 HTTP/1.1\r\nHost: gw\r\n")
        line = b"x-pad: " + b"a" * 4000 + b"\r\n"
        try:
            for _ in range(2000):          # 8 MB of head, never finished
                s.sendall(line)
        except (ConnectionResetError, BrokenPipeError):
            pass                           # closed by the gateway mid-way: what we want
        data = _read_until_closed(s)
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), data[:200]
    assert json.loads(body)["error"]["code"] == "headers_too_large"


def test_a_head_within_the_bound_is_served(security_mesh):
    r = httpx.get(f"{security_mesh.url}/v1/household/acc-unknown-431",
                  headers={"X-API-Key": security_mesh.role_keys[Role.ADMIN],
                           **{f"x-pad-{i}": "b" * 1000 for i in range(40)}}, timeout=15)
    assert r.status_code in (200, 404), r.text


def test_a_trickled_request_head_is_408_within_the_deadline_and_others_are_served(tight_gateway, security_mesh):
    """Until session 19 a head sent a byte at a time (never finished) held its connection
    for as long as the client liked: uvicorn's only timer runs between requests. Now it is
    answered 408 HEARTH_HEAD_TIMEOUT_S after the connection opened, while the gateway
    keeps serving everyone else."""
    port, url = tight_gateway
    admin = {"X-API-Key": security_mesh.role_keys[Role.ADMIN]}
    tricklers = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(8)]
    head = b"GET /v1/household/slow-head-acc HTTP/1.1\r\nHost: gw\r\nx-pad: " + b"a" * 200
    started = time.monotonic()
    closed_at: dict[int, float] = {}
    data = {i: b"" for i in range(len(tricklers))}
    try:
        for s in tricklers:
            s.setblocking(False)
        sent = 0
        while len(closed_at) < len(tricklers) and time.monotonic() - started < HEAD_TIMEOUT_S + 20:
            for i, s in enumerate(tricklers):
                if i in closed_at:
                    continue
                try:
                    if sent < len(head):
                        s.send(head[sent:sent + 1])
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    pass
                try:
                    chunk = s.recv(4096)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    data[i] += chunk
                else:
                    closed_at[i] = time.monotonic() - started
            sent += 1
            # Others are served while the heads trickle.
            if sent % 10 == 0:
                r = httpx.get(f"{url}/v1/household/slow-head-other", headers=admin, timeout=15)
                assert r.status_code in (200, 404), (r.status_code, r.text)
            time.sleep(0.1)
    finally:
        for s in tricklers:
            s.close()
    assert len(closed_at) == len(tricklers), closed_at
    for i, answer in data.items():
        status, _, rest = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408"), answer[:200]
        assert json.loads(rest)["error"]["code"] == "request_timeout"
        assert HEAD_TIMEOUT_S - 0.5 <= closed_at[i] < HEAD_TIMEOUT_S + 10, closed_at
    r = httpx.get(f"{url}/v1/household/slow-head-other", headers=admin, timeout=15)
    assert r.status_code in (200, 404), r.text


def test_a_connection_that_sends_nothing_is_closed_after_the_head_deadline(tight_gateway):
    port, _ = tight_gateway
    s = socket.create_connection(("127.0.0.1", port), timeout=HEAD_TIMEOUT_S + 20)
    try:
        started = time.monotonic()
        data = _read_until_closed(s)
        elapsed = time.monotonic() - started
    finally:
        s.close()
    assert data == b""          # nothing asked, nothing answered: closed
    assert elapsed < HEAD_TIMEOUT_S + 10


def test_the_head_deadline_runs_again_after_each_response_not_while_the_request_is_served(tight_gateway,
                                                                                           security_mesh):
    """A keep-alive connection: a request whose body comes later than the head deadline
    (but within the body's) is served — the deadline stops once a head is complete —
    then the next head is trickled → 408 on that connection."""
    port, _ = tight_gateway
    key = security_mesh.role_keys[Role.ADMIN].encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=HEAD_TIMEOUT_S + 20)
    try:
        body = b'{"events": []}'
        s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nX-API-Key: " + key
                  + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        time.sleep(HEAD_TIMEOUT_S + 0.5)     # < BODY_TIMEOUT_S
        s.sendall(body)
        first = b""
        while b"\r\n\r\n" not in first:
            chunk = s.recv(65536)
            assert chunk, first
            first += chunk
        assert first.startswith((b"HTTP/1.1 200", b"HTTP/1.1 422")), first[:300]   # served, not 408
        length = int(next(line.split(b":")[1] for line in first.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(first.partition(b"\r\n\r\n")[2]) < length:
            first += s.recv(65536)
        s.sendall(b"GET /v1/household/slow-head-ka HTTP/1.1\r\n")   # and no more
        started = time.monotonic()
        rest = _read_until_closed(s)
        elapsed = time.monotonic() - started
    finally:
        s.close()
    assert b"HTTP/1.1 408" in rest, rest[-300:]
    assert elapsed < HEAD_TIMEOUT_S + 10


def _seed_large_household(url: str, admin_key: str, account: str) -> int:
    """10,000 closed sessions (5 devices x 2,000, 31 minutes apart): a page of them is
    ~5 MB of JSON, more than the kernel's socket buffers take. Returns its byte size."""
    now = datetime.now(UTC).replace(microsecond=0)
    events = [{"event_id": f"e{i}-{d}", "account_id": account, "device_id": f"dev-{d}", "device_type": "tv",
               "ts": (now - timedelta(minutes=31 * (i + 1))).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "kind": "play_start", "title_id": f"t-{i % 50}", "genres": ["drama"], "duration_s": 1200,
               "maturity": "adult"} for i in reversed(range(2000)) for d in range(5)]   # oldest first
    headers = {"X-API-Key": admin_key}
    for start in range(0, len(events), 500):   # the security mesh's body limit is 256 KiB
        r = httpx.post(f"{url}/v1/events", headers=headers, json={"events": events[start:start + 500]}, timeout=120)
        assert r.status_code == 200, r.text
    page = httpx.get(f"{url}/v1/household/{account}?limit=10000", headers=headers, timeout=60)
    assert page.status_code == 200, page.text
    return len(page.content)


def _ask(port: int, path: str, key: str, small_buffer: bool = True) -> socket.socket:
    s = socket.socket()
    if small_buffer:   # the kernel holds little for us: the rest waits at the gateway
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\nX-API-Key: {key}\r\n\r\n".encode())
    return s


def _read_all(s: socket.socket, timeout_s: float, pause_s: float = 0.0, chunk: int = 1 << 20) -> tuple[bytes, str]:
    """Everything the connection gives until it ends ('closed') or ``timeout_s`` passes
    with nothing new ('open')."""
    s.settimeout(timeout_s)
    data = b""
    try:
        while True:
            got = s.recv(chunk)
            if not got:
                return data, "closed"
            data += got
            if pause_s:
                time.sleep(pause_s)
    except ConnectionResetError:
        return data, "closed"
    except TimeoutError:
        return data, "open"


def _status_and_body(data: bytes) -> tuple[bytes, int, int]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:"))
    return lines[0], length, len(body)


def _responses_not_taken(url: str) -> float:
    """hearth_gateway_responses_not_taken_total of a replica serving /metrics on its port."""
    page = httpx.get(f"{url}/metrics", timeout=10).text
    return float(next(line.split()[-1] for line in page.splitlines()
                      if line.startswith("hearth_gateway_responses_not_taken_total ")))


def test_a_response_its_client_does_not_take_is_cut_off_not_held(tight_gateway, security_mesh):
    """attack26: a client that asked for a large answer and never read it held the unsent
    rest in the gateway's memory for as long as it kept the connection (150 such of one
    caller: +207 MB, held). Now a client must take 1 MiB of it (or all that is left) in
    every head deadline (2 s here), else the connection is aborted; one that reads with
    pauses is served whole."""
    port, url = tight_gateway
    key = security_mesh.role_keys[Role.ADMIN]
    size = _seed_large_household(url, key, "slow-reader-acc")
    assert size > 4_000_000, size
    path = "/v1/household/slow-reader-acc?limit=10000"
    patient = _ask(port, path, key, small_buffer=False)
    stalled: list[socket.socket] = []
    try:
        data, end = _read_all(patient, 30, pause_s=0.1, chunk=256 * 1024)   # at most 2.5 MiB/s
        status, length, got = _status_and_body(data)
        assert status == b"HTTP/1.1 200 OK" and got == length, (status, length, got, end)
        aborted_before = _responses_not_taken(url)
        stalled = [_ask(port, path, key) for _ in range(MAX_IN_FLIGHT)]
        time.sleep(6 * HEAD_TIMEOUT_S)   # answered (a second or two), then two deadlines unread
        cut = []
        for s in stalled:
            data, end = _read_all(s, 30)
            status, length, got = _status_and_body(data)
            assert status == b"HTTP/1.1 200 OK", data[:300]
            cut.append((end, got < length))
        # Before the fix each was still open, and reading now gave the whole answer.
        assert cut == [("closed", True)] * MAX_IN_FLIGHT, cut
        assert _responses_not_taken(url) == aborted_before + MAX_IN_FLIGHT
    finally:
        for s in [*stalled, patient]:
            s.close()
