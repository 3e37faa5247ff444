"""The security suite's own mesh: four services and a gateway as real processes, with
their own service-token key, an API key per role, an RS256 JWT issuer, and a small body
limit; plus two more gateway replicas with tight rate limits that share one budget in a
real redis-server."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway import auth
from services.common.identity import Role
from services.testing.mesh import Mesh

ISSUER = "https://idp.security-suite.test"
AUDIENCE = "hearth-security-suite"
MAX_BODY = 256 * 1024
# One token every 4 s: slow enough that a burst is measured deterministically on a loaded
# 2-core machine, fast enough that recovery takes seconds.
LIMIT_PER_S, LIMIT_BURST = 0.25, 3
REFLECTION_STREAM_S = 4.0


@dataclass
class SecurityMesh:
    mesh: Mesh
    keys_file: Path
    role_keys: dict[Role, str]
    jwt_private_key: rsa.RSAPrivateKey
    limited_urls: list[str]

    @property
    def url(self) -> str:
        return self.mesh.url

    def jwt(self, role: Role = Role.ADMIN, subject: str = "sec-jwt-user", key=None, algorithm="RS256",
            **overrides) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "hearth_role": role.value,
                  "iat": now, "exp": now + 300}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, key if key is not None else self.jwt_private_key, algorithm=algorithm)

    def client(self, role: Role = Role.ADMIN, url: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=url or self.url, headers={"X-API-Key": self.role_keys[role]}, timeout=15)


def _wait(url: str, proc, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway replica exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy")


# Package scope, like tests/e2e's mesh: only tests/security uses it, and its seven processes
# stop after the package's last test instead of idling through the rest of the run.
@pytest.fixture(scope="package")
def security_mesh(tmp_path_factory, redis_url):
    base = tmp_path_factory.mktemp("security-mesh")
    keys_file = base / "var" / "gateway-keys.json"
    role_keys = {role: auth.add_key(keys_file, f"sec-{role.value}", role.value)[1] for role in Role}
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = base / "jwt-public.pem"
    public_pem.write_bytes(private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    env = {
        "HEARTH_JWT_ALGORITHM": "RS256",
        "HEARTH_JWT_PUBLIC_KEY_FILE": str(public_pem),
        "HEARTH_JWT_ISSUER": ISSUER,
        "HEARTH_JWT_AUDIENCE": AUDIENCE,
        "HEARTH_MAX_BODY_BYTES": str(MAX_BODY),
        # Generous on the main gateway (the fuzz and the matrix sweep must not trip it).
        "HEARTH_RATE_LIMIT_DEFAULT": json.dumps({"per_s": 1000, "burst": 1000}),
        # One costly attribution in flight per principal (the default is 2): the in-flight
        # test then needs one costly request, not two (tests/security/test_costly_requests.py).
        "HEARTH_IN_FLIGHT_LIMITS": json.dumps({"POST /v1/attribution": 1}),
        # Idle reflection streams are cancelled after 4 s (10 s by default): the test that
        # holds two waits for them to end by themselves (tests/security/test_costly_requests.py).
        "HEARTH_REFLECTION_STREAM_S": str(REFLECTION_STREAM_S),
        # The fuzz's valid POST /v1/keys/rotate-households (older_than_days ~ 0) really rotates
        # the households other tests left, and a rotation waits out its settle (70 s by
        # default: the stores' key caches) before it answers — past the fuzz's 30 s read
        # timeout (the from-nothing drill of 2c44df6). The tests here write nothing while a
        # rotation runs, which is what makes a short settle safe (docs/operations.md).
        "HEARTH_DEK_ROTATION_SETTLE_S": "0.5",
    }
    mesh = Mesh.on_free_ports(base / "var", log_dir=base / "logs", extra_env=env)
    replicas: list[str] = []
    try:
        mesh.start_healthy(120)
        limited_env = {**mesh.env(), "HEARTH_REDIS_URL": redis_url,
                       "HEARTH_RATE_LIMIT_DEFAULT": json.dumps({"per_s": LIMIT_PER_S, "burst": LIMIT_BURST})}
        urls = []
        for i in range(2):
            name = f"gateway-limited-{i}"
            replicas.append(name)
            port = mesh.spawn_on_free_ports(name, "gateway", limited_env, ("HEARTH_GATEWAY_PORT",))["HEARTH_GATEWAY_PORT"]
            urls.append(f"http://127.0.0.1:{port}")
        for name, url in zip(replicas, urls):
            _wait(url, mesh.processes[name])
        yield SecurityMesh(mesh, keys_file, role_keys, private_key, urls)
    finally:
        for name in replicas:
            mesh.stop_process(name)
        mesh.stop()


@pytest.fixture(scope="package")
def mesh_logs(security_mesh) -> Path:
    return security_mesh.mesh.log_dir
