"""Start the whole mesh as local processes: used by `make run` and the end-to-end tests.

Each service and the gateway run as their own process (as in Kubernetes), with ports,
data directory and tracing given through HEARTH_* variables. ``Mesh.wait_healthy``
polls the gateway's /health until every service is SERVING. ``Mesh.start_healthy`` (what
``running_mesh``, the fixtures and ``scripts/run.py`` use) starts a mesh on drawn ports
again on new ones when another process took one before its server bound it
(services/testing/ports.py).
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from gateway.auth import hash_key
from services.common.child_process import spawn_tied, stop_group
from services.testing.ports import PortTaken, check_exit, free_port, hold_port, listened_by, start_on_free_ports

SERVICE_MODULES = ("clustering", "attribution", "privacy", "feedback")
T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]   # the repository


# The default bound of each process's log under `make run` (scripts/run.py --log-max-bytes,
# --log-backups): at most (1 + LOG_BACKUPS) x LOG_MAX_BYTES a process, 200 MB for the five.
# Until session 33 the logs grew without end: a keyless client at 80 requests/s (a 401 is a
# security-event line and an access line, ~650 bytes) filled the data dir's disk at ~190 MB/h,
# and a full data dir stops the mesh (ops33).
LOG_MAX_BYTES = 10_000_000
LOG_BACKUPS = 3


def rotate_log(path: Path, max_bytes: int, backups: int) -> bool:
    """When ``path`` holds more than ``max_bytes``: copy it to ``<path>.1`` (``.1`` to ``.2``
    ..., the oldest beyond ``backups`` dropped) and truncate it in place; True if it did.

    Copy-and-truncate, not rename, because a child's stdout/stderr *is* this file (an fd
    it inherited; nothing in the child knows the name): a renamed file keeps receiving the
    child's lines. The fd is opened O_APPEND (``_spawn``), so after the truncation the
    child's next write lands at the new end (0), with no hole. The price, as logrotate's
    copytruncate: a line written between the copy and the truncation is lost (the copy of
    10 MB takes milliseconds)."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    if backups < 1:
        os.truncate(path, 0)
        return True
    for n in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
    newest = path.with_name(f"{path.name}.1")
    try:
        shutil.copyfile(path, newest)
    except OSError:
        # No room for the copy (the very case this is for: a full disk): emptying the log
        # frees its space, which matters more than keeping its lines.
        newest.unlink(missing_ok=True)
    os.truncate(path, 0)
    return True


@functools.lru_cache(maxsize=16)
def _source_of(root: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8", errors="replace")
                     for p in sorted((root / "services").rglob("*.py")) + sorted((root / "gateway").rglob("*.py")))


def reads_variable(root: Path, name: str) -> bool:
    """Whether the tree at ``root`` reads the HEARTH_* variable ``name``: a settings field
    of its name (``erasure_fence_s: ...`` for HEARTH_ERASURE_FENCE_S) or the name itself
    in its services' or gateway's source. (The CLI's per-service DSN variables, named by an
    f-string, are not found: no service process reads them.) Checked against each older
    tree the tests run, where it agrees with that tree's own ``config.known_variables()``."""
    field_name = name.removeprefix("HEARTH_").lower()
    source = _source_of(root)
    return name in source or re.search(rf"^\s+{re.escape(field_name)}\s*:", source, re.M) is not None


def write_api_key(path: Path, principal: str = "demo-admin", role: str = "admin",
                  key: str | None = None) -> str:
    """Create an API key, store only its SHA-256 in ``path`` (appending), return the key.
    ``principal``'s earlier keys are dropped. The file may be a plain list of records or the
    ``{"keys", "revoked"}`` document ``python -m gateway.auth`` writes (an operator adding a
    key to ``make run``'s file: until session 26 the next ``make run`` died on it); its
    format, other keys and revocations are kept."""
    key = key or "hk_" + secrets.token_urlsafe(24)
    document = json.loads(path.read_text()) if path.exists() else []
    records = document if isinstance(document, list) else document.setdefault("keys", [])
    records[:] = [r for r in records if r.get("principal") != principal]
    records.append({"sha256": hash_key(key), "principal": principal, "role": role})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
    path.chmod(0o600)
    return key


# The HEARTH_*_PORT variables a process binds (a service's default, the gateway's); 0 or
# unset binds nothing.
_SERVICE_LISTENS = ("HEARTH_GRPC_PORT", "HEARTH_METRICS_PORT", "HEARTH_HEALTH_PORT")
_LISTENS = {"gateway": ("HEARTH_GATEWAY_PORT", "HEARTH_METRICS_PORT", "HEARTH_EDGE_AUTHORIZER_PORT")}


@dataclass
class Mesh:
    data_dir: Path
    gateway_port: int = 8080
    grpc_ports: dict[str, int] = field(default_factory=lambda: {
        "clustering": 50051, "attribution": 50052, "privacy": 50053, "feedback": 50054})
    metrics_ports: dict[str, int] = field(default_factory=lambda: {
        "clustering": 9101, "attribution": 9102, "privacy": 9103, "feedback": 9104})
    gateway_metrics_port: int = 9100
    extra_env: dict[str, str] = field(default_factory=dict)
    # Per process name ("gateway", "privacy", ...), applied over extra_env.
    process_env: dict[str, dict[str, str]] = field(default_factory=dict)
    log_dir: Path | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    # The key of the ps_ pseudonyms in every process's logs (one per mesh, so a household
    # has one pseudonym across processes).
    log_pseudonym_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    _service_keys: dict[str, Path] = field(default_factory=dict, repr=False)
    # The source tree the processes run from (bench.assign_cpu runs an older commit's tree).
    root: Path = ROOT
    # Mutual TLS between the processes: a development CA and one certificate per process
    # (scripts/certs.py, as `make certs`) written here, each process given its own.
    tls_dir: Path | None = None

    # On drawn ports (``on_free_ports``): another process may take one before its server
    # binds, and ``start_healthy`` then draws them all again. A mesh on fixed ports (`make
    # run`'s 8080, 50051-...) never changes them.
    drawn: bool = False
    # More ports drawn with the mesh's own (and drawn again with them), as HEARTH_*_PORT
    # variables of one process: {"gateway": ("HEARTH_EDGE_AUTHORIZER_PORT",)}; read back
    # with ``port_of``.
    more_ports: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The ports each process was given to listen on (its HEARTH_*_PORT variables): it is up
    # once it listens on them itself, and its output names the one that was taken.
    _ports: dict[str, list[int]] = field(default_factory=dict, repr=False)
    # Where each process's log stood when it was spawned: only what it wrote since is its
    # own (a log is appended to across restarts and attempts).
    _log_offsets: dict[str, int] = field(default_factory=dict, repr=False)
    # On drawn ports, every port a process was given, held by this process
    # (``ports.hold_port``) from its spawn until the mesh stops or draws new ports: a process
    # stopped and started again on its own port (its peers hold the address: a restart, a
    # rolling upgrade, an outage test) found it taken by another suite's server now and then,
    # which drew it as free while ours was down (session 35's "left"; session 36).
    _held: dict[int, object] = field(default_factory=dict, repr=False)

    @classmethod
    def on_free_ports(cls, data_dir: Path, **kwargs) -> "Mesh":
        mesh = cls(data_dir, drawn=True, **kwargs)
        mesh.draw_ports()
        return mesh

    def draw_ports(self) -> None:
        """Every port of the mesh drawn anew (``free_port``), ``more_ports`` too."""
        self.release_ports()
        self.gateway_port = free_port()
        self.grpc_ports = {s: free_port() for s in SERVICE_MODULES}
        self.metrics_ports = {s: free_port() for s in SERVICE_MODULES}
        self.gateway_metrics_port = free_port()
        for name, variables in self.more_ports.items():
            self.process_env[name] = {**self.process_env.get(name, {}), **{v: str(free_port()) for v in variables}}

    def port_of(self, name: str, variable: str) -> int:
        """The port ``more_ports`` drew for process ``name``'s ``variable``."""
        return int(self.process_env[name][variable])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.root != ROOT:
            # Another commit's tree (a rolling upgrade's release before, a bench baseline):
            # a HEARTH_* variable of this environment that it does not read would stop each
            # of its processes (an unknown variable is refused, config.check_environment) —
            # e.g. the test run's HEARTH_ERASURE_FENCE_S (tests/conftest.py) in a tree from
            # before session 30. What this mesh sets itself (below, extra_env) is kept.
            env = {k: v for k, v in env.items() if not k.startswith("HEARTH_") or reads_variable(self.root, k)}
        env.update({
            "HEARTH_DATA_DIR": str(self.data_dir),
            "HEARTH_API_KEYS_FILE": str(self.data_dir / "gateway-keys.json"),
            "HEARTH_GATEWAY_PORT": str(self.gateway_port),
            "HEARTH_LOG_PSEUDONYM_KEY": self.log_pseudonym_key,
            # Each process signs with its own component's key (added in _spawn) and
            # verifies with every component's public key (service_keys.py); a tree from
            # before session 19 (bench.assign_cpu --baseline REF) gets the shared secret
            # it knows instead.
            **({"HEARTH_SERVICE_PUBLIC_KEYS_FILE": str(self.service_keys()["keyset"])} if self.component_keys
               else {"HEARTH_SERVICE_TOKEN_KEY": self.log_pseudonym_key}),
            **{f"HEARTH_{s.upper()}_ADDR": f"127.0.0.1:{p}" for s, p in self.grpc_ports.items()},
            "PYTHONPATH": str(self.root) + os.pathsep + env.get("PYTHONPATH", ""),
        })
        env.update(self.extra_env)
        return env

    @property
    def component_keys(self) -> bool:
        """Whether the tree the processes run from signs with a key per component."""
        return (self.root / "services" / "common" / "service_keys.py").exists()

    @property
    def service_keys_dir(self) -> Path:
        return self.data_dir / "service-keys"

    def service_keys(self) -> dict[str, Path]:
        """Every component's private key file and the keyset (``"keyset"``), generated
        into the data dir on first use and kept there (``make run`` needs no setup)."""
        from services.common import service_keys

        if not self._service_keys:
            self._service_keys.update(service_keys.generate(self.service_keys_dir))
        return self._service_keys

    def signer(self, component: str):
        """Signs as ``component`` would (its private key), for tests and tools that call a
        service directly: ``signer("gateway")`` for a person's principal,
        ``signer("privacy")`` for ``svc:privacy``."""
        from services.common import service_keys

        keys = self.service_keys()
        return service_keys.ComponentTokenSigner(service_keys.load_private_key(keys[component]),
                                                 service_keys.load_keyset(keys["keyset"]), 300.0)

    def signing_env(self, component: str, env: dict[str, str]) -> dict[str, str]:
        """``env`` for a process of ``component``: with only its own private key (the
        gateway process cannot sign as svc:privacy). Also for a gateway started beside the
        mesh (bench.assign_cpu --baseline-gateway)."""
        if (component in SERVICE_MODULES or component == "gateway") and "HEARTH_SERVICE_PUBLIC_KEYS_FILE" in env:
            return {"HEARTH_SERVICE_SIGNING_KEY_FILE": str(self.service_keys()[component]), **env}
        return env

    def certificates(self) -> dict[str, Path]:
        """With ``tls_dir``: the CA (``"ca"``) and every process's certificate, generated on
        first use (``<name>.pem``, ``<name>-key.pem``, names ``hearth-<name>``, loopback)."""
        import importlib.util

        if self.tls_dir is None:
            raise ValueError("tls_dir: this mesh runs without TLS")
        spec = importlib.util.spec_from_file_location("hearth_certs_script", ROOT / "scripts" / "certs.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.generate(self.tls_dir, (*SERVICE_MODULES, "gateway"))

    def tls_env(self, component: str) -> dict[str, str]:
        """HEARTH_TLS_* for a process of ``component`` (its own certificate only), or {}."""
        if self.tls_dir is None:
            return {}
        ca = self.certificates()["ca"]
        return {"HEARTH_TLS_CERT": str(self.tls_dir / f"{component}.pem"),
                "HEARTH_TLS_KEY": str(self.tls_dir / f"{component}-key.pem"), "HEARTH_TLS_CA": str(ca)}

    def _spawn(self, name: str, module: str, env: dict[str, str]) -> None:
        component = module.rsplit(".", 1)[-1]
        env = {**self.signing_env(component, env), **self.tls_env(component)}
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")
            self._log_offsets[name] = out.tell()
        env = {**env, **self.process_env.get(name, {})}
        self._ports[name] = [int(env[v]) for v in _LISTENS.get(component, _SERVICE_LISTENS)
                             if env.get(v, "").isdigit() and int(env[v]) > 0]
        if self.drawn:
            for port in self._ports[name]:
                if port not in self._held and (held := hold_port(port)) is not None:
                    self._held[port] = held
        # Tied to this process: killed by the kernel if it dies (a crashed test run or
        # `make run` killed with -9 leaves nothing behind).
        self.processes[name] = spawn_tied([sys.executable, "-m", module], cwd=self.root, env=env,
                                          stdout=out, stderr=out)

    def start_service(self, name: str) -> None:
        env = self.env()
        env["HEARTH_GRPC_PORT"] = str(self.grpc_ports[name])
        env["HEARTH_METRICS_PORT"] = str(self.metrics_ports[name])
        self._spawn(name, f"services.{name}", env)

    def start_gateway(self) -> None:
        self._spawn("gateway", "gateway", {**self.env(), "HEARTH_METRICS_PORT": str(self.gateway_metrics_port)})

    def start(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)   # personal data and keys
        for name in SERVICE_MODULES:
            self.start_service(name)
        self.start_gateway()

    def start_healthy(self, timeout_s: float = 120.0) -> dict:
        """``start`` and ``wait_healthy``, the way every fixture and ``running_mesh`` start
        a mesh. On drawn ports, when a process exits at start-up because another process
        took its port (``PortTaken``, read from its log), the mesh is stopped, ALL its
        ports are drawn again (peers' addresses are in every process's environment) and it
        is started again: at most ``ports.ATTEMPTS`` times, each logged with the port that
        failed (services/testing/ports.py). On fixed ports, or without a log to read, the
        exit is an error at once, as before."""
        return self._start_on_drawn_ports(self.start, lambda: self.wait_healthy(timeout_s),
                                          f"the mesh in {self.data_dir}")

    def start_listening(self, names: tuple[str, ...] | list[str], timeout_s: float = 120.0) -> None:
        """Start only the processes ``names`` (services, or "gateway") and return once each
        listens on its ports itself (``wait_bound``; its peers' absence only degrades its
        health); on a taken port, as ``start_healthy``: stopped, every port drawn
        again, started again. A process that exits otherwise raises RuntimeError with its
        log's end."""
        def start() -> None:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name in names:
                self.start_gateway() if name == "gateway" else self.start_service(name)

        self._start_on_drawn_ports(start, lambda: self.wait_bound(names, timeout_s),
                                   f"{', '.join(names)} in {self.data_dir}")

    def _start_on_drawn_ports(self, start: Callable[[], None], wait: Callable[[], T], what: str) -> T:
        """``start()`` then ``wait()``; the mesh stopped if either fails. On drawn ports, a
        port taken (``PortTaken``) is answered by drawing all the ports again and starting
        again (``ports.start_on_free_ports``)."""
        def attempt(number: int) -> T:
            if number > 1:
                self.draw_ports()
            try:
                start()
                return wait()
            except BaseException:
                self.stop()
                raise

        return start_on_free_ports(attempt, what) if self.drawn else attempt(1)

    def spawn_on_free_ports(self, name: str, module: str, env: dict[str, str], variables: tuple[str, ...],
                            timeout_s: float = 120.0) -> dict[str, int]:
        """Spawn one more process beside the mesh (a replica, a second gateway) with each of
        ``variables`` (HEARTH_*_PORT) on a drawn port over ``env``, and return those ports
        once it has bound them; a port taken before its bind is drawn again (its own ports
        only: no peer knows them yet), as ``start_healthy`` does for the mesh."""
        def attempt(_number: int) -> dict[str, int]:
            ports = {variable: free_port() for variable in variables}
            self._spawn(name, module, {**env, **{v: str(p) for v, p in ports.items()}})
            try:
                self.wait_bound([name], timeout_s)
            except BaseException:
                self.stop_process(name)
                raise
            return ports

        return start_on_free_ports(attempt, f"{name} beside the mesh in {self.data_dir}")

    def wait_bound(self, names, timeout_s: float = 120.0) -> None:
        """Until each of ``names`` listens on every port it was given itself (a port that
        answers may be another process's: ``ports.listened_by``) — no bind can fail after
        that —, or raise as ``wait_healthy`` does when one exits first."""
        deadline = time.monotonic() + timeout_s
        while True:
            for name in names:
                self._check_running(name)
            waiting = {name: ports for name in names if (ports := self._not_yet_bound(name))}
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"ports not listening after {timeout_s:g} s: {waiting}")
            time.sleep(0.1)

    def _not_yet_bound(self, name: str) -> list[int]:
        """The ports process ``name`` was given that it does not listen on itself (yet)."""
        ports = self._ports.get(name, [])
        return sorted(set(ports) - listened_by(self.processes[name].pid, ports))

    def _check_running(self, name: str) -> None:
        """Raise if process ``name`` has exited: ``PortTaken`` when its log says its port
        was taken, else RuntimeError with its log's end."""
        proc = self.processes[name]
        if proc.poll() is None:
            return
        self.check_port_taken(name)
        raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up{self.log_tail(name)}")

    def check_port_taken(self, name: str) -> None:
        """Raise ``PortTaken`` if what process ``name`` wrote to its log since it was
        spawned says a port it was given was taken (``ports.check_exit``); else nothing —
        also for a mesh without logs. For a process that has exited."""
        path = self.log_dir / f"{name}.log" if self.log_dir is not None else None
        if path is not None and path.exists():
            with open(path, "rb") as f:
                f.seek(self._log_offsets.get(name, 0))
                check_exit(name, f.read().decode(errors="replace"), self._ports.get(name, []))

    def wait_healthy(self, timeout_s: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            for name in list(self.processes):
                self._check_running(name)
            try:
                r = httpx.get(self.url + "/health", timeout=2.0)
                last = r.json()
                # SERVING from this mesh's own gateway, every process on its own ports: another
                # process on a drawn port (a second suite's gateway) answers too, while ours
                # is still starting, to exit on the taken port.
                if r.status_code == 200 and last.get("status") == "SERVING" and \
                        not any(self._not_yet_bound(name) for name in self.processes):
                    return last
            except (httpx.HTTPError, ValueError) as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"mesh not healthy after {timeout_s}s: {last}")

    def rotate_logs(self, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> list[str]:
        """``rotate_log`` on every process's log (when the mesh keeps logs); the names of
        those rotated. `make run` calls it every half second."""
        if self.log_dir is None:
            return []
        rotated = []
        for name in list(self.processes):
            try:
                if rotate_log(self.log_dir / f"{name}.log", max_bytes, backups):
                    rotated.append(name)
            except OSError:   # a log we cannot rotate must not stop `make run`'s loop (and the mesh)
                pass
        return rotated

    def log_tail(self, name: str, chars: int = 2000) -> str:
        """The end of a process's log (when the mesh keeps logs), to say why it died."""
        path = self.log_dir / f"{name}.log" if self.log_dir is not None else None
        if path is None or not path.exists():
            return ""
        return f"; the end of {path}:\n" + path.read_bytes()[-chars:].decode(errors="replace")

    def stop_process(self, name: str, timeout_s: float = 30.0) -> None:
        # SIGTERM, then SIGKILL after timeout_s: longer than HEARTH_GRACE_SECONDS (10 s) and
        # the closers after it, so a graceful stop is never cut short here.
        proc = self.processes.pop(name, None)
        if proc is not None:
            stop_group(proc, timeout_s)

    def stop(self) -> None:
        """The gateway first (no new requests reach the services), then the services all at
        once: each drains and exits on its own, so stopping them one after the other only
        added up their exit times (~1-2 s each on a loaded machine, for every mesh a test
        run starts)."""
        self.stop_process("gateway")
        with ThreadPoolExecutor(len(SERVICE_MODULES)) as pool:
            list(pool.map(self.stop_process, [name for name in SERVICE_MODULES if name in self.processes]))
        for name in list(self.processes):   # anything else a caller spawned (replicas)
            self.stop_process(name)
        self.release_ports()

    def release_ports(self) -> None:
        """Let go of the ports held for this mesh's processes (``_held``)."""
        while self._held:
            self._held.popitem()[1].close()


@contextmanager
def running_mesh(base: Path, keys: dict[str, str] | None = None, timeout_s: float = 180.0,
                 **mesh_kwargs) -> Iterator[Mesh]:
    """A mesh of its own on free ports under ``base`` (data in var/, logs in logs/), with an
    API key per ``{principal: role}`` (``mesh.keys[principal]``; the first one also as
    ``mesh.api_key``), healthy before it is yielded and stopped afterwards."""
    mesh = Mesh.on_free_ports(base / "var", log_dir=base / "logs", **mesh_kwargs)
    mesh.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    mesh.keys = {principal: write_api_key(mesh.data_dir / "gateway-keys.json", principal, role)
                 for principal, role in (keys or {"e2e-admin": "admin"}).items()}
    mesh.api_key = next(iter(mesh.keys.values()))
    mesh.start_healthy(timeout_s)
    try:
        yield mesh
    finally:
        mesh.stop()
