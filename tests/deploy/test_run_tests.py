"""scripts/run_tests.py, what `make test` runs: two long-lived pytest processes taking test
files from one work queue, longest first, files sharing a package fixture together
(docs/benchmarks.md, "Session 28"). Every collected file runs exactly once, a stop starts
nothing new, every process's output is printed, the run fails when any test fails, and a
killed run leaves no pytest behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import run_tests  # noqa: E402

MESH = "suite/e2e::mesh"


def test_make_test_runs_the_runner():
    makefile = (ROOT / "Makefile").read_text()
    rule = makefile.split("\ntest: ", 1)[1].split("\n\n", 1)[0]
    assert "$(PY) scripts/run_tests.py $(ARGS)" in rule and "-m pytest" not in rule


def test_files_sharing_a_package_fixture_are_one_group_and_every_file_is_in_one():
    collected = {"u/a.py": [], "e/m1.py": [MESH], "u/b.py": [], "e/m2.py": [MESH, "e::other"],
                 "e/o.py": ["e::other"], "s/x.py": ["s::secmesh"], "e/m3.py": [MESH], "s/y.py": ["s::secmesh"]}
    groups = run_tests.group_files(collected)
    assert groups == [["u/a.py"], ["e/m1.py", "e/m2.py", "e/o.py", "e/m3.py"], ["u/b.py"], ["s/x.py", "s/y.py"]]
    handed = [name for group in groups for name in group]
    assert sorted(handed) == sorted(collected) and len(handed) == len(set(handed))
    assert run_tests.group_files({}) == []


def test_groups_are_handed_out_longest_first_and_an_unrecorded_file_counts_as_the_longest():
    groups = [["a"], ["m1", "m2"], ["b"], ["c"], ["new"]]
    seconds = {"a": 5.0, "m1": 4.0, "m2": 4.0, "b": 30.0, "c": 6.0}
    assert run_tests.order_groups(groups, seconds) == [["b"], ["new"], ["m1", "m2"], ["c"], ["a"]]
    # with b not recorded either, the longest recorded file is c's 6 s: b and new count 6 s each
    del seconds["b"]
    assert run_tests.order_groups(groups, seconds) == [["m1", "m2"], ["b"], ["c"], ["new"], ["a"]]
    # no record: each file counts 1 s, so a group counts its files; ties keep collection order
    assert run_tests.order_groups(groups, {}) == [["m1", "m2"], ["a"], ["b"], ["c"], ["new"]]


def test_a_missing_or_broken_record_is_no_record(tmp_path):
    assert run_tests.load_durations(tmp_path / "absent.json") == {}
    for text in ("{not json", "[]", '{"seconds": [1, 2]}', '{"about": "x"}', '{"seconds": {"a": "slow"}}'):
        (tmp_path / "d.json").write_text(text)
        assert run_tests.load_durations(tmp_path / "d.json") == {}, text
    (tmp_path / "d.json").write_text('{"seconds": {"tests/a.py": 2.5}}')
    assert run_tests.load_durations(tmp_path / "d.json") == {"tests/a.py": 2.5}


def test_the_recorded_durations_are_readable():
    seconds = run_tests.load_durations(run_tests.DURATIONS)
    assert len(seconds) >= 50 and all(v >= 0 and name.startswith("tests/") and name.endswith(".py")
                                      for name, v in seconds.items())


def test_every_test_file_has_a_recorded_duration():
    # A file with no record is handed out as the longest recorded one (order_groups): it
    # costs balance, and the record is how the runner splits the suite, so it is kept whole.
    recorded = run_tests.load_durations(run_tests.DURATIONS)
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py"))
    missing = [name for name in files if name not in recorded]
    assert not missing, (f"no record in tests/durations.json for {missing}: measure them with `python "
                         f"scripts/run_tests.py --write-durations {' '.join(missing[:3])} ...` (the other records are "
                         f"kept)")
    assert not [name for name in recorded if not (ROOT / name).is_file()], "records of files that are gone"


def test_a_narrowed_run_writes_its_files_and_keeps_the_others_records(tmp_path):
    root = tmp_path / "p"
    for name in ("tests/test_a.py", "tests/test_b.py", "tests/e2e/test_new.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    record = root / "durations.json"
    record.write_text(json.dumps({"seconds": {"tests/test_a.py": 3.0, "tests/test_b.py": 40.0,
                                              "tests/test_gone.py": 9.0}}))
    run_tests._write_durations(record, ["tests/e2e/test_new.py", "tests/test_a.py"],
                               [{"tests/e2e/test_new.py": 12.34}, {"tests/test_a.py": 4.0}], 60.0, root)
    assert run_tests.load_durations(record) == {"tests/e2e/test_new.py": 12.3, "tests/test_a.py": 4.0,
                                                "tests/test_b.py": 40.0}
    assert "2 of 3 files measured by this run, the others' records kept" in json.loads(record.read_text())["about"]


def test_workers_taking_at_once_get_every_file_exactly_once():
    collected = {f"t/f{i}.py": ([MESH] if i % 7 == 0 else []) for i in range(300)}
    queue = run_tests.WorkQueue({name: float(i % 13) for i, name in enumerate(collected)})
    got: dict[int, list[list[str]]] = {1: [], 2: [], 3: []}

    def worker(number: int) -> None:
        queue.collected(number, collected)
        while group := queue.take(number):
            got[number].append(group)

    threads = [threading.Thread(target=worker, args=(n,)) for n in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    handed = [name for groups in got.values() for group in groups for name in group]
    assert sorted(handed) == sorted(collected) and len(handed) == len(set(handed))
    mesh_groups = [g for groups in got.values() for g in groups if any(collected[n] for n in g)]
    assert len(mesh_groups) == 1 and mesh_groups[0] == [n for n in collected if collected[n]]
    assert queue.not_run() == [] and queue.take(1) == []


def test_a_stopped_queue_hands_out_nothing_more():
    queue = run_tests.WorkQueue({})
    queue.collected(1, {"a.py": [], "b.py": [], "c.py": []})
    assert queue.take(1) == ["a.py"]
    queue.stop("interrupted")
    assert queue.take(2) == [] and queue.take(1) == []
    assert queue.not_run() == ["b.py", "c.py"] and queue.stopped == "interrupted"


def test_a_summary_keeps_the_warnings_count_and_a_warnings_only_end_is_a_summary():
    """A worker handed no file, whose collection warned, ends on "1 warning in 5.85s": the
    runner's line says so instead of "(no summary: ...)" (newcomer34)."""
    warned = ("=== warnings summary ===\nx.py:1\n  x.py:1: DeprecationWarning: old\n\n"
              "-- Docs: https://docs.pytest.org/en/stable/how-to/capture-warnings.html\n")
    assert run_tests.summary(warned + "1 warning in 5.85s\n") == "1 warning in 5.85s"
    assert run_tests.summary(warned + "== 141 passed, 2 warnings in 41.05s ==\n") == "141 passed, 2 warnings in 41.05s"
    assert run_tests.summary("Traceback ...\nSegmentation fault\n") == "(no summary: Segmentation fault)"


def test_workers_that_collected_different_files_run_nothing():
    queue = run_tests.WorkQueue({})
    queue.collected(1, {"a.py": [], "b.py": []})
    queue.collected(2, {"a.py": [], "c.py": []})
    assert queue.take(1) == [] and "worker 2 collected other files" in queue.stopped
    assert queue.not_run() == ["a.py", "b.py"]


# ---- the real runner on a small project of its own ----

def _project(tmp_path: Path, files: dict[str, str]) -> Path:
    """A pytest project under tmp_path/p (its own rootdir); each test appends
    "<pid> <nodeid>" to ran.log as it starts."""
    root = tmp_path / "p"
    (root / "suite").mkdir(parents=True)
    (root / "pytest.ini").write_text("[pytest]\ntestpaths = suite\n")
    (root / "suite" / "conftest.py").write_text(textwrap.dedent(f"""
        import os
        import pytest

        @pytest.fixture(autouse=True)
        def _record(request):
            with open({str(root / "ran.log")!r}, "a") as f:
                f.write(f"{{os.getpid()}} {{request.node.nodeid}}\\n")
        """))
    for name, text in files.items():
        path = root / "suite" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def _ran(root: Path) -> list[tuple[int, str]]:
    log = root / "ran.log"
    return [(int(p), n) for p, n in (line.split(" ", 1) for line in log.read_text().splitlines())] if log.exists() else []


MESH_CONFTEST = """
    import os
    import pytest

    @pytest.fixture(scope="package")
    def mesh():
        with open(os.path.join(os.path.dirname(__file__), "..", "..", "mesh.log"), "a") as f:
            f.write(f"{os.getpid()}\\n")
        yield "mesh"
    """
USES_MESH = """
    def test_one(mesh):
        assert mesh == "mesh"

    def test_two(mesh):
        assert mesh == "mesh"
    """


def test_the_runner_runs_every_test_once_keeps_a_shared_fixture_in_one_process_and_fails_on_a_failure(
        tmp_path, monkeypatch, capsys):
    root = _project(tmp_path, {
        "test_a.py": "def test_a():\n    pass\n",
        "test_b.py": "import pytest\n\n@pytest.mark.parametrize('n', range(5))\ndef test_b(n):\n    pass\n",
        "test_fails.py": "def test_fails():\n    assert 1 == 2, 'the planted failure'\n",
        "e2e/__init__.py": "", "e2e/conftest.py": MESH_CONFTEST,
        **{f"e2e/test_m{i}.py": USES_MESH for i in range(4)},
        "e2e/test_own.py": "def test_own():\n    pass\n",
    })
    monkeypatch.setenv("PYTHONPATH", str(ROOT))   # the workers import tests.helpers.queue_worker
    record = root / "durations.json"
    record.write_text(json.dumps({"seconds": {"suite/test_b.py": 100.0, "suite/test_a.py": 1.0}}))
    rc = run_tests.run(["-p", "no:cacheprovider"], root=root, durations=record, write_durations=True)
    out = capsys.readouterr().out
    assert rc == 1, out[-3000:]
    ran = _ran(root)
    nodeids = [n for _, n in ran]
    assert len(nodeids) == len(set(nodeids)) == 1 + 5 + 1 + 4 * 2 + 1, out[-3000:]
    mesh_pids = {p for p, n in ran if "/test_m" in n}
    assert len(mesh_pids) == 1 and (root / "mesh.log").read_text().split() == [str(mesh_pids.pop())]
    assert "FAILED suite/test_fails.py::test_fails - AssertionError: the planted failure" in out
    assert "suite/e2e/test_m0.py (+3 files sharing its package fixture)" in out
    assert ("make test: no recorded seconds for 6 files (handed out as the longest; `scripts/run_tests.py "
            "--write-durations FILE...` records them): suite/e2e/test_m0.py, suite/e2e/test_m1.py") in out
    summary = next(line for line in out.splitlines() if line.startswith("make test: worker 1: "))
    assert "; worker 2: " in summary and "; wall " in summary and "NOT RUN" not in summary and "1 failed" in summary
    # longest first: the mesh's group (four files with no record: each counts as the longest
    # recorded, 100 s), then the 100 s ones in collection order, then the 1 s one
    handed = [line.split(": ", 1)[1].split(" (+")[0] for line in out.splitlines()
              if line.startswith("make test [") and ": suite/" in line]
    assert handed == ["suite/e2e/test_m0.py", "suite/e2e/test_own.py", "suite/test_b.py", "suite/test_fails.py",
                      "suite/test_a.py"], out[-3000:]
    written = run_tests.load_durations(record)
    assert set(written) == {"suite/test_a.py", "suite/test_b.py", "suite/test_fails.py", "suite/e2e/test_own.py",
                            *(f"suite/e2e/test_m{i}.py" for i in range(4))}


def test_the_script_runs_as_make_runs_it():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_tests.py"), "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert done.stdout.count("\npytest ") == 1, done.stdout[-2000:]   # one process answers --version
    # pytest answers --version and --help without a session: until session 34 the runner took
    # the missing summary for a crash and said "worker 1 DIED" (exit 0 all the same).
    assert "DIED" not in done.stdout, done.stdout[-2000:]


def test_a_pytest_process_dies_with_a_killed_runner():
    from tests.helpers.processes import alive
    from tests.helpers.waiting import wait_for

    runner = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time; sys.path.insert(0, 'scripts'); import run_tests; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], preexec_fn=run_tests._child_setup); "
        "print(p.pid, flush=True); time.sleep(120)")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(runner.stdout.readline())
    try:
        assert alive(child)
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
        wait_for(lambda: not alive(child), timeout_s=30, what=f"pytest's stand-in {child} to die with the runner",
                 interval_s=0.05)
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


SLOW = """
    import os
    import time

    def test_slow():
        open(os.path.join(os.path.dirname(__file__), "..", "started-" + os.path.basename(__file__)), "w").close()
        time.sleep(60)
    """


def _runner_stopped_by(signum: int, tmp_path: Path) -> tuple[int, float, list[str], str]:
    """A real runner on a project of two 60 s files (recorded as the longest) and three quick
    ones, stopped by ``signum`` (SIGTERM to the runner: a CI timeout; SIGINT to its process
    group: Ctrl-C) once both workers are in a slow file: (its exit status, seconds it took
    to end, the tests that ran, its output)."""
    root = _project(tmp_path / signal.Signals(signum).name, {
        "test_slow1.py": SLOW, "test_slow2.py": SLOW,
        **{f"test_quick{i}.py": "def test_quick():\n    pass\n" for i in range(3)}})
    (root / "durations.json").write_text(json.dumps({"seconds": {
        "suite/test_slow1.py": 60, "suite/test_slow2.py": 60, **{f"suite/test_quick{i}.py": 1 for i in range(3)}}}))
    script = root / "runner.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
        "import run_tests\n"
        "from pathlib import Path\n"
        f"sys.exit(run_tests.run(['-p', 'no:cacheprovider'], root=Path({str(root)!r}), "
        f"durations=Path({str(root / 'durations.json')!r})))\n")
    runner = subprocess.Popen([sys.executable, str(script)], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while not all((root / f"started-test_slow{i}.py").exists() for i in (1, 2)):
            assert time.monotonic() < deadline and runner.poll() is None, "the slow files did not both start"
            time.sleep(0.1)
        began = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(runner.pid, signum)   # the terminal's Ctrl-C reaches the whole group
        else:
            runner.send_signal(signum)
        out, _ = runner.communicate(timeout=60)
        return runner.returncode, time.monotonic() - began, [n for _, n in _ran(root)], out
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()


def test_a_stopped_run_starts_nothing_new(tmp_path):
    """A CI timeout's SIGTERM or a Ctrl-C while both workers run stops the run: no file is
    handed out after it (review27: the old runner's last process was started after a stop)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        rc, took, ran, out = _runner_stopped_by(signum, tmp_path)
        name = signal.Signals(signum).name
        assert sorted(ran) == ["suite/test_slow1.py::test_slow", "suite/test_slow2.py::test_slow"], (name, out[-3000:])
        assert rc != 0 and took < 30, (name, rc, took, out[-3000:])
        assert "NOT RUN" in out and "3 files" in out, (name, out[-3000:])


def test_a_worker_stopped_by_x_stops_the_queue(tmp_path, monkeypatch, capsys):
    """``make test ARGS=-x``: the first failure ends its worker and no file is handed out
    after it (one worker here, so which files ran is certain)."""
    root = _project(tmp_path, {"test_fails.py": "def test_fails():\n    assert False\n",
                               **{f"test_ok{i}.py": "def test_ok():\n    pass\n" for i in range(3)}})
    record = root / "durations.json"
    record.write_text(json.dumps({"seconds": {"suite/test_fails.py": 10.0, **{f"suite/test_ok{i}.py": 1.0
                                                                             for i in range(3)}}}))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    rc = run_tests.run(["-x", "-p", "no:cacheprovider"], root=root, workers=1, durations=record)
    out = capsys.readouterr().out
    assert rc == 1 and [n for _, n in _ran(root)] == ["suite/test_fails.py::test_fails"], out[-3000:]
    assert "NOT RUN (worker 1 stopped: " in out and ": 3 files" in out, out[-3000:]


def _runner_output(root: Path, args: list[str], workers: int, timeout_s: float, **env: str) -> tuple[int, str]:
    """The real runner in a process of its own on ``root``'s project (its durations.json):
    (its exit status, its output); a runner still running after ``timeout_s`` is killed and
    fails the test (a hung worker held `make test` until CI's limit)."""
    script = root / "runner.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
        "import run_tests\n"
        "from pathlib import Path\n"
        f"sys.exit(run_tests.run({args!r}, root=Path({str(root)!r}), workers={workers}, "
        f"durations=Path({str(root / 'durations.json')!r})))\n")
    runner = subprocess.Popen([sys.executable, str(script)], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    try:
        out, _ = runner.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(runner.pid, signal.SIGKILL)
        out, _ = runner.communicate()
        raise AssertionError(f"the runner did not end within {timeout_s:g} s:\n{out[-3000:]}") from None
    return runner.returncode, out


def test_a_worker_that_crashes_is_named_with_its_test_and_the_other_worker_goes_on(tmp_path):
    """A worker killed by a signal (a segfault in a C extension, the one seen in CI) fails
    the run naming the test it was running, its traceback (pytest's faulthandler) in its
    output, and the other worker runs the rest. Until session 29 the run failed with the
    worker's summary missing and no word of which test took the process down."""
    root = _project(tmp_path, {
        "test_crash.py": "import ctypes\n\ndef test_crash():\n    ctypes.string_at(0)\n",
        **{f"test_quick{i}.py": "def test_quick():\n    pass\n" for i in range(3)}})
    (root / "durations.json").write_text(json.dumps({"seconds": {
        "suite/test_crash.py": 100, **{f"suite/test_quick{i}.py": 1 for i in range(3)}}}))
    rc, out = _runner_output(root, ["-p", "no:cacheprovider"], workers=2, timeout_s=120)
    assert rc == 128 + signal.SIGSEGV, out[-3000:]
    assert "DIED (killed by SIGSEGV, running suite/test_crash.py::test_crash)" in out, out[-3000:]
    assert "Fatal Python error: Segmentation fault" in out and 'line 4 in test_crash' in out, out[-3000:]
    assert sorted(n for _, n in _ran(root) if "quick" in n) == [
        f"suite/test_quick{i}.py::test_quick" for i in range(3)], out[-3000:]


def test_a_worker_exiting_0_in_the_middle_of_a_file_fails_the_run(tmp_path):
    """A test (or the code it calls) ending its process with status 0 leaves the rest of its
    file unrun: the worker is DIED and the run fails, as the README says of a worker that
    crashes, while the other worker runs the rest. Until review34 the run exited 0 (the DIED
    line the only word of the tests never run)."""
    root = _project(tmp_path, {
        "test_exits.py": "import os\n\ndef test_exits():\n    os._exit(0)\n\ndef test_never_runs():\n    pass\n",
        **{f"test_quick{i}.py": "def test_quick():\n    pass\n" for i in range(2)}})
    (root / "durations.json").write_text(json.dumps({"seconds": {
        "suite/test_exits.py": 100, **{f"suite/test_quick{i}.py": 1 for i in range(2)}}}))
    rc, out = _runner_output(root, ["-p", "no:cacheprovider"], workers=2, timeout_s=120)
    assert "DIED (exit 0 without pytest's summary, running suite/test_exits.py::test_exits)" in out, out[-3000:]
    assert rc == 3, out[-3000:]
    assert sorted(n for _, n in _ran(root)) == ["suite/test_exits.py::test_exits"] + [
        f"suite/test_quick{i}.py::test_quick" for i in range(2)], out[-3000:]


HANGS = """
    import signal
    import threading

    def test_hangs():
        # A wait pytest-timeout's SIGALRM cannot end (as a call in C that never returns
        # to the interpreter): the signal blocked, then an endless wait.
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        threading.Event().wait()
    """


def test_a_test_hanging_past_pytest_timeout_ends_its_worker_with_every_threads_traceback(tmp_path):
    """A hang pytest-timeout's signal cannot break: the worker's backstop (faulthandler's
    watchdog, its limit past pytest-timeout's) prints where every thread stood and ends the
    process; the run fails naming the test and the files not run. Until session 29 the
    runner waited for that worker for ever (seen: this test's runner killed at its limit)."""
    root = _project(tmp_path, {"test_hang.py": HANGS, "test_after.py": "def test_after():\n    pass\n"})
    (root / "durations.json").write_text(json.dumps({"seconds": {"suite/test_hang.py": 100, "suite/test_after.py": 1}}))
    rc, out = _runner_output(root, ["-p", "no:cacheprovider", "-o", "timeout=1"], workers=1, timeout_s=90,
                             HEARTH_TEST_BACKSTOP_MARGIN_S="2")
    assert rc != 0 and "DIED (exit 1 without pytest's summary, running suite/test_hang.py::test_hangs)" in out, \
        out[-3000:]
    assert "Timeout (0:00:" in out and "in test_hangs" in out, out[-3000:]   # faulthandler's dump of the stack
    assert "NOT RUN (no worker left to take them): 1 files, e.g. suite/test_after.py" in out, out[-3000:]
    assert [n for _, n in _ran(root)] == ["suite/test_hang.py::test_hangs"], out[-3000:]

def test_a_plain_pytest_run_of_the_suite_ends_a_hung_test_with_every_threads_traceback(tmp_path):
    """`pytest -q tests/unit` (one process, no runner; docs28 saw tests/unit stall at load ~24
    when `make test-unit` was such a run): tests/conftest.py arms the same backstop, so a hang
    pytest-timeout cannot break ends with the tracebacks rather than never. Seen failing
    before session 29's conftest (the run had not ended after 90 s)."""
    (tmp_path / "test_hang.py").write_text(textwrap.dedent(HANGS))
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                            "-o", "timeout=1", "--rootdir", str(tmp_path), str(tmp_path / "test_hang.py")],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "HEARTH_TEST_BACKSTOP_MARGIN_S": "2"})
    try:
        out, _ = run.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        out, _ = run.communicate()
        raise AssertionError(f"the hung run did not end within 90 s:\n{out[-3000:]}") from None
    assert run.returncode == 1 and "Timeout (0:00:" in out and "in test_hangs" in out, out[-3000:]
