"""The figures of docs/security.md, "Attacker's review (session 21)", items 8 and 9 (session 22):
one analyst's sixteen costly attributions against the per-principal in-flight bound, and an
analyst's answers for a withdrawn account and one never seen. Starts its own mesh of real
processes (services.testing.mesh, default settings): `OMP_NUM_THREADS=1 .venv/bin/python
scripts/costly_requests_figures.py` (about a minute)."""
import json, random, re, socket, statistics, sys, tempfile, time
from pathlib import Path
import httpx
from gateway import auth
from services.testing.mesh import Mesh

def iso(t): return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
base = Path(tempfile.mkdtemp(prefix="limit22-"))
keys = base / "var" / "gateway-keys.json"
admin = auth.add_key(keys, "m-admin", "admin")[1]
analyst = auth.add_key(keys, "m-analyst", "analyst")[1]
officer = auth.add_key(keys, "m-officer", "privacy_officer")[1]
mesh = Mesh.on_free_ports(base / "var", log_dir=base / "logs")
mesh.start_healthy(120)
def metric(port, name, **labels):
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith(name + "{") and set(labels.items()) <= set(re.findall(r'(\w+)="([^"]*)"', l)))
try:
    A = httpx.Client(base_url=mesh.url, headers={"X-API-Key": admin}, timeout=60)
    N = httpx.Client(base_url=mesh.url, headers={"X-API-Key": analyst}, timeout=60)
    O = httpx.Client(base_url=mesh.url, headers={"X-API-Key": officer}, timeout=60)
    rng = random.Random(21); now = time.time()
    accounts = [f"m-costly-{i}" for i in range(300)]
    tps = [{"touchpoint_id": f"t{j}", "account_id": a, "device_id": "tv-1", "ts": iso(now - 86400 + j * 600),
            "channel": f"ch{rng.randrange(12)}"} for a in accounts for j in range(10)]
    for i in range(0, len(tps), 1000):
        assert A.post("/v1/touchpoints", json={"touchpoints": tps[i:i + 1000]}).status_code == 200
    assert A.post("/v1/conversions", json={"conversions": [{"conversion_id": "c", "account_id": a, "ts": iso(now - 80000),
              "kind": "buy", "value": 5.0} for a in accounts[::2]]}).status_code == 200
    # --- 1. sixteen costly attributions at once by one analyst
    costly = json.dumps({"account_ids": accounts, "method": "hybrid", "markov_order": 4, "repeats": "keep",
                         "level": "household", "bootstrap_replicates": 2000, "bootstrap_seed": 1}).encode()
    port = int(mesh.url.rsplit(":", 1)[1])
    gm, am = mesh.gateway_metrics_port, mesh.metrics_ports["attribution"]
    socks, statuses = [], []
    t0 = time.monotonic()
    for _ in range(16):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(b"POST /v1/attribution HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-API-Key: "
                  + analyst.encode() + b"\r\nContent-Length: " + str(len(costly)).encode() + b"\r\n\r\n" + costly)
        socks.append(s)
    time.sleep(3)
    for s in socks:
        s.settimeout(0.2)
        try:
            head = s.recv(65536).split(b"\r\n", 1)[0]
            statuses.append(head.decode())
        except socket.timeout:
            statuses.append("in flight")
    held = metric(gm, "hearth_gateway_caller_in_flight", route="POST /v1/attribution")
    served_in_flight = metric(am, "hearth_rpc_in_flight", service="attribution")
    print("16 costly attributions, one analyst:", {x: statuses.count(x) for x in set(statuses)},
          "gateway slots held", held, "attribution rpc_in_flight", served_in_flight)
    small = {"account_ids": ["m-nobody"], "method": "linear"}
    r = N.post("/v1/attribution", json=small)
    print("the analyst's small request meanwhile:", r.status_code, r.headers.get("retry-after"), r.text)
    r = A.post("/v1/attribution", json=small); print("the admin's small request meanwhile:", r.status_code)
    before = metric(am, "hearth_rpc_requests_total", service="attribution", method="Attribute", code="DEADLINE_EXCEEDED")
    t1 = time.monotonic()
    for s in socks: s.close()
    while N.post("/v1/attribution", json=small).status_code != 200: time.sleep(0.05)
    t_slot = time.monotonic() - t1
    while metric(am, "hearth_rpc_requests_total", service="attribution", method="Attribute", code="DEADLINE_EXCEEDED") < before + held:
        time.sleep(0.1)
        if time.monotonic() - t1 > 90: break
    t_work = time.monotonic() - t1
    print(f"after the 16 clients closed: slot back in {t_slot:.2f} s; both attribution calls stopped in {t_work:.2f} s;"
          f" rpc_in_flight now {metric(am, 'hearth_rpc_in_flight', service='attribution')}")
    # --- 2. the consent oracle
    for a in ("m-kept", "m-gone"):
        assert A.post("/v1/touchpoints", json={"touchpoints": [{"touchpoint_id": f"{a}-{i}", "account_id": a,
                  "device_id": "tv-1", "ts": iso(now - 7200 + i * 600), "channel": f"{a}-ch"} for i in range(3)]}).status_code == 200
        assert A.post("/v1/conversions", json={"conversions": [{"conversion_id": "c", "account_id": a,
                  "ts": iso(now - 3600), "kind": "buy", "value": 3.0}]}).status_code == 200
    assert O.put("/v1/consent/m-gone", json={"processing": True, "attribution": False}).status_code == 200
    while A.post("/v1/attribution", json={"account_ids": ["m-gone"]}).status_code != 412: time.sleep(0.2)
    r = A.post("/v1/attribution", json={"account_ids": ["m-gone"]}); print("admin, [m-gone]:", r.status_code, r.text)
    def timed(accounts, k=30):
        ts, bodies = [], set()
        for i in range(k):
            t = time.perf_counter(); r = N.post("/v1/attribution", json={"account_ids": accounts, "method": "linear"})
            ts.append(time.perf_counter() - t); bodies.add((r.status_code, r.text.replace("m-never", "m-gone")))
        return statistics.median(ts) * 1000, bodies
    for pair in ((["m-gone"], ["m-never"]), (["m-kept", "m-gone"], ["m-kept", "m-never"])):
        # interleave, so load changes hit both alike
        (tg, bg), (tn, bn) = timed(pair[0], 1), timed(pair[1], 1)
        gs, ns = [], []
        for i in range(30):
            gs.append(timed(pair[0], 1)[0]); ns.append(timed(pair[1], 1)[0])
        print(f"analyst {pair[0]} vs {pair[1]}: same answer {bg == bn} ({next(iter(bg))[0]}); "
              f"median {statistics.median(gs):.1f} ms vs {statistics.median(ns):.1f} ms")
    print(N.post("/v1/attribution", json={"account_ids": ["m-gone"], "method": "linear"}).text)
finally:
    mesh.stop()
