"""Ports for the servers the tests, ``make verify`` and ``scripts/run.py --free-ports`` start,
and what to do when another process takes one first.

``free_port`` draws a port nothing is bound to now and remembers it, but only in this
process: another process on the machine (a second test suite, another worker of `make
test`, a chroot that shares the host's network) can draw and bind the same port between
this check and our server's bind. No drawing rule can prevent that (the check and the bind
are in different processes); the server then exits at start-up ("Failed to bind to
address", "Address already in use"). Session 34 saw it twice in ~15 minutes of two suites
run at once, each time failing a whole fixture. What holds is to recognise that exit from
the server's own output (``bind_failure``) and start again on ports drawn anew
(``start_on_free_ports``): the servers' addresses are in their peers' settings, so a
caller draws all the ports of what it starts again, never one alone.
"""

from __future__ import annotations

import logging
import random
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger("hearth.testing.ports")

# Starts tried before a port clash is reported as an error. Each clash needs another
# process to bind one of ~10 freshly drawn ports out of ~20,000 in the second between draw
# and bind, so a second attempt that clashes too is already rare; four that all clash is a
# port that something keeps taking, which is worth a clear failure.
ATTEMPTS = 4

# What a server prints when its port is taken (EADDRINUSE): gRPC's "Failed to bind to
# address 127.0.0.1:N", Python's OSError "[Errno 98] Address already in use" (the metrics
# port, services/common/telemetry.serve_metrics, names its address), uvicorn's "error while
# attempting to bind on address ('127.0.0.1', N): address already in use", PostgreSQL's
# 'could not bind IPv4 address "127.0.0.1": Address already in use', redis-server's
# "Could not create server TCP listening socket 127.0.0.1:N: bind: Address already in use".
_BIND_FAILED = re.compile(r"address already in use|failed to bind to address", re.IGNORECASE)
_PORT_NUMBER = re.compile(r"(?<![\d.])(\d{4,5})(?!\d)")


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999   # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing is bound to now, for a server started next.

    Chosen at random *below* the kernel's ephemeral range: every outgoing connection on
    the machine (load generators, database clients, other test runs) takes its local port
    from that range, so a port picked there can be taken between this check and the
    server's bind — a process that then exits at start-up with "address in use". Falls
    back to a kernel-chosen port where the range leaves no room.

    A port is handed out once per process: a mesh asks for about ten ports before any
    server binds, and two random draws from the same 20,000 would otherwise collide in
    about one mesh in 500 (seen as "address already in use" at start-up). Another process
    can still take it before the bind: ``start_on_free_ports`` is what holds then."""
    low, _ = _ephemeral_ports()
    if low > 12000:
        for _ in range(100):
            port = random.randrange(10000, low)
            if port in _HANDED_OUT:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _HANDED_OUT.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _HANDED_OUT.add(port)
    return port


_HANDED_OUT: set[int] = set()


def hold_port(port: int) -> socket.socket | None:
    """A socket bound to 127.0.0.1:``port`` with SO_REUSEADDR and never listening, so that
    no other process takes the port while ours may need it again: ``free_port``'s check in
    any process (a plain bind) fails on it, so no other suite draws it, while a server's
    own bind — gRPC, uvicorn, http.server (the metrics port), PostgreSQL and redis-server
    all set SO_REUSEADDR — still succeeds as long as nothing LISTENs there. None if the
    port cannot be bound (another process listens on it already). Close it to let go."""
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        held.bind(("127.0.0.1", port))
    except OSError:
        held.close()
        return None
    return held


class PortTaken(RuntimeError):
    """A server exited at start-up because a port it was given was already taken.

    ``what`` names the server (a process of a mesh, "PostgreSQL", ...), ``port`` the port
    its output names (None where it names none and the server had several), ``line`` that
    output's line."""

    def __init__(self, what: str, port: int | None, line: str, message: str | None = None) -> None:
        self.what, self.port, self.line = what, port, line
        super().__init__(message or f"{what} could not bind port {port if port is not None else '?'} "
                                    f"(taken by another process): {line}")


def bind_failures(output: str) -> list[str]:
    """The lines of a server's output that say it could not bind a port."""
    return [line.strip() for line in output.splitlines() if _BIND_FAILED.search(line)]


def named_port(line: str, ports: Iterable[int]) -> int | None:
    """Which of ``ports`` (the server's own) ``line`` names."""
    ports = set(ports)
    return next((int(n) for n in _PORT_NUMBER.findall(line) if int(n) in ports), None)


def check_exit(what: str, output: str, ports: Iterable[int]) -> None:
    """Raise ``PortTaken`` if ``output`` (of a server that exited at start-up) says a port
    was taken — the line that names which of its ``ports`` if one does (a chained
    traceback says it twice), else the server's only port —; else nothing (the caller
    reports the exit as it did)."""
    ports = list(ports)
    lines = bind_failures(output)
    if not lines:
        return
    for line in lines:
        if (port := named_port(line, ports)) is not None:
            raise PortTaken(what, port, line)
    raise PortTaken(what, ports[0] if len(ports) == 1 else None, lines[0])


def listened_by(pid: int, ports: Iterable[int]) -> set[int]:
    """Which of ``ports`` process ``pid`` itself listens on (TCP, IPv4 or IPv6), from
    /proc: a server that answers on a drawn port may be ANOTHER process's (a second suite's
    gateway, PostgreSQL or Redis on the port ours failed to bind), so "it answers" is not
    "ours is up". Where /proc cannot be read (not Linux), every port is taken as ours."""
    wanted = set(ports)
    if not Path("/proc/net/tcp").exists():
        return wanted
    inodes: dict[str, int] = {}
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if fields[3] == "0A" and port in wanted:   # 0A: LISTEN
                    inodes[f"socket:[{fields[9]}]"] = port
        own = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = str(fd.readlink())
            except OSError:   # closed meanwhile
                continue
            if target in inodes:
                own.add(inodes[target])
        return own
    except FileNotFoundError:   # the process has exited
        return set()


def start_on_free_ports(start: Callable[[int], T], what: str, attempts: int | None = None) -> T:
    """``start(attempt)`` (1, 2, ...), again while it raises ``PortTaken``, at most
    ``attempts`` times, each new attempt logged (a warning) with the port that failed.

    ``start`` starts what it starts and returns once it is up; from the second attempt it
    first draws ALL its ports again (``free_port``) — peers know each other's addresses —
    and it stops whatever it started before raising. Anything else it raises is raised at
    once. When no port clashes this is one call: it costs nothing. After ``attempts``
    (default ``ATTEMPTS``) clashes: ``PortTaken`` saying so, naming the last port."""
    attempts = attempts or ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            return start(attempt)
        except PortTaken as exc:
            if attempt == attempts:
                raise PortTaken(exc.what, exc.port, exc.line,
                                f"{what}: a port was taken at start-up on each of {attempts} attempts, "
                                f"each on newly drawn ports; the last: {exc}") from exc
            log.warning("%s: port %s was taken at start-up (%s); starting again on new ports, attempt %d of %d",
                        what, exc.port if exc.port is not None else "?", exc.line, attempt + 1, attempts)
    raise AssertionError("unreachable")


def serve_on_free_port(command: Callable[[int], Sequence[str]], log_path: Path, what: str,
                       timeout_s: float = 120.0, env_for: Callable[[int], dict[str, str]] | None = None,
                       **popen_kwargs) -> tuple[subprocess.Popen, int]:
    """A server of one port that no other process knows yet (prometheus for a test, say):
    ``command(port)`` spawned (tied to this process: services/common/child_process.py)
    with its output appended to ``log_path``, in the environment ``env_for(port)`` when
    given (a server told its port by a variable: bench.assign_cpu's older gateway);
    returned with its port once it listens on it itself. On a taken port (its output says
    so) it is started again on a new one (``start_on_free_ports``); an exit for another
    reason raises RuntimeError with its output."""
    from services.common.child_process import spawn_tied

    def attempt(_number: int) -> tuple[subprocess.Popen, int]:
        port = free_port()
        if env_for is not None:
            popen_kwargs["env"] = env_for(port)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            offset = log.tell()
            proc = spawn_tied(list(command(port)), stdout=log, stderr=log, **popen_kwargs)
        deadline = time.monotonic() + timeout_s
        while not listened_by(proc.pid, [port]):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                with open(log_path, "rb") as log:
                    log.seek(offset)
                    output = log.read().decode(errors="replace")
                check_exit(what, output, [port])
                raise RuntimeError(f"{what} did not start in {timeout_s:g} s (exit code {proc.returncode}):\n"
                                   f"{output[-2000:]}")
            time.sleep(0.1)
        return proc, port

    return start_on_free_ports(attempt, what)
