"""`make run`'s demo key writer (``services.testing.mesh.write_api_key``) against a keys
file an operator has managed with ``python -m gateway.auth`` (attack26: `make run` after
`gateway.auth --file var/gateway-keys.json add alice analyst` died with
``AttributeError: 'str' object has no attribute 'get'`` before starting anything)."""

from __future__ import annotations

import json

from gateway import auth
from services.testing.mesh import write_api_key


def _principals(path) -> dict[str, list[auth.ApiKeyRecord]]:
    found: dict[str, list[auth.ApiKeyRecord]] = {}
    for record in auth.load_api_keys(path):
        found.setdefault(record.principal.id, []).append(record)
    return found


def test_the_demo_key_is_added_beside_keys_and_revocations_the_operator_made(tmp_path):
    path = tmp_path / "gateway-keys.json"
    first = write_api_key(path)                       # the first `make run`
    alice_id, alice = auth.add_key(path, "alice", "analyst")
    bob_id, _ = auth.add_key(path, "bob", "analyst")
    auth.revoke_key(path, bob_id)
    second = write_api_key(path)                      # `make run` again
    keys = _principals(path)
    assert [r.sha256 for r in keys["demo-admin"]] == [auth.hash_key(second)]   # the old demo key is gone
    assert first != second
    assert [(r.id, r.revoked) for r in keys["alice"]] == [(alice_id, False)]
    assert [(r.id, r.revoked) for r in keys["bob"]] == [(bob_id, True)]       # still revoked
    store = auth.ApiKeyStore(path)
    assert store.lookup(alice).principal.id == "alice"
    assert store.lookup(second).principal.id == "demo-admin"
    assert json.loads(path.read_text())["revoked"] == [bob_id]


def test_a_file_in_the_list_format_stays_readable_by_gateway_auth(tmp_path):
    path = tmp_path / "gateway-keys.json"
    write_api_key(path, "ci-admin", "admin")
    key_id, key = auth.add_key(path, "carol", "privacy_officer")   # converts it to the document format
    write_api_key(path, "ci-admin", "admin")
    assert auth.ApiKeyStore(path).lookup(key).principal.id == "carol"
    assert {r.principal.id for r in auth.load_api_keys(path)} == {"ci-admin", "carol"}
