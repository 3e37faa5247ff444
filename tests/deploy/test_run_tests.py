"""scripts/run_tests.py, what `make test` runs: the suite as two pytest processes side by side
(docs/benchmarks.md, "Session 24") and a third for ``LAST`` after whichever of them ends first
("Session 27"). Every test file is in exactly one of them, every process's output is
printed, the run fails when any fails, and a killed run leaves none behind."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import run_tests  # noqa: E402


def test_make_test_runs_the_two_halves():
    makefile = (ROOT / "Makefile").read_text()
    rule = makefile.split("\ntest: ", 1)[1].split("\n\n", 1)[0]
    assert "$(PY) scripts/run_tests.py $(ARGS)" in rule and "-m pytest" not in rule


def test_every_test_directory_is_in_exactly_one_half():
    first, second, last = run_tests.commands(["-x"])
    assert first[first.index("-m") + 1:first.index("-m") + 4] == ["pytest", "-q", "-x"]
    assert last[last.index("-m") + 1:last.index("-m") + 4] == ["pytest", "-q", "-x"]
    first_dirs, last_paths = first[first.index("-x") + 1:], last[last.index("-x") + 1:]
    assert first_dirs == list(run_tests.FIRST_HALF) and all((ROOT / d).exists() for d in first_dirs)
    assert last_paths == list(run_tests.LAST) and all((ROOT / p).is_file() for p in last_paths)
    # none of the last's files is under a directory of the first's
    assert not [p for p in last_paths for d in first_dirs if p == d or p.startswith(d.rstrip("/") + "/")]
    # the second is the configured testpaths ("tests") with exactly the others' paths ignored
    assert second[-1] == "tests" and "tests" not in first and "tests" not in last
    assert [a for a in second if a.startswith("--ignore=")] == [f"--ignore={d}" for d in first_dirs + last_paths]
    assert 'testpaths = ["tests"]' in (ROOT / "pyproject.toml").read_text()
    with_tests = {p.parent.relative_to(ROOT).parts[:2] for p in (ROOT / "tests").rglob("test_*.py")}
    assert {"/".join(parts) for parts in with_tests} >= {d for d in first_dirs if (ROOT / d).is_dir()}


def _fake(code: int, line: str) -> list[str]:
    return [sys.executable, "-c", f"print('.' * 3); print({line!r}); raise SystemExit({code})"]


def _fake_after(code: int, line: str, delay_s: float) -> list[str]:
    return [sys.executable, "-c", f"import time; time.sleep({delay_s}); print({line!r}); raise SystemExit({code})"]


def test_every_output_is_printed_and_any_failure_fails_the_run(monkeypatch, capsys):
    import signal

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for first_rc, second_rc, last_rc, want in ((0, 0, 0, 0), (1, 0, 0, 1), (0, 1, 0, 1), (2, 1, 0, 2),
                                               (0, 0, 3, 3), (0, 1, 3, 1)):
        monkeypatch.setattr(run_tests, "commands", lambda args, a=first_rc, b=second_rc, c=last_rc: (
            _fake(a, f"{3 + a} passed in 1.00s"), _fake(b, f"{5 + b} passed in 2.00s"),
            _fake(c, f"{7 + c} passed in 3.00s")))
        assert run_tests.main([]) == want
        out = capsys.readouterr().out
        assert f"{3 + first_rc} passed in 1.00s" in out and f"{5 + second_rc} passed in 2.00s" in out
        assert f"{7 + last_rc} passed in 3.00s" in out
        last = out.strip().splitlines()[-1]
        assert f"test_deletion_lease.py: {3 + first_rc} passed in 1.00s; the rest: {5 + second_rc} passed in 2.00s" in last
        assert f"test_verify_quick.py after the " in last and f"{7 + last_rc} passed in 3.00s; wall" in last
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers   # given back


def test_the_last_starts_after_whichever_half_ends_first(monkeypatch, capsys):
    """Not before either half has ended, and not after both: it runs beside the longer."""
    for first_s, second_s, after in ((0.1, 2.0, "the first half"), (2.0, 0.1, "the rest")):
        monkeypatch.setattr(run_tests, "commands", lambda args, a=first_s, b=second_s: (
            _fake_after(0, "1 passed in 1.00s", a), _fake_after(0, "2 passed in 1.00s", b),
            [sys.executable, "-c", "import time; print(time.time(), '3 passed in 1.00s')"]))
        began = time.time()
        assert run_tests.main([]) == 0
        out = capsys.readouterr().out
        started = float(next(line for line in out.splitlines() if line.endswith("3 passed in 1.00s")).split()[0])
        summary = out.strip().splitlines()[-1]
        assert f"test_verify_quick.py after {after}: " in summary and "3 passed in 1.00s; wall" in summary
        assert began + min(first_s, second_s) <= started < began + max(first_s, second_s), (started - began)


def test_the_script_runs_as_make_runs_it():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_tests.py"), "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert done.stdout.count("\npytest ") == 3, done.stdout[-2000:]   # both halves and the last ran


def test_a_pytest_process_dies_with_a_killed_runner():
    import os
    import signal

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


def _runner_stopped_by(signum: int, tmp_path: Path) -> tuple[int, float, bool]:
    """A real runner whose halves sleep 60 s, stopped by ``signum`` (SIGTERM to the runner:
    a CI timeout; SIGINT to its process group: Ctrl-C) while both run: (its exit status,
    seconds it took to end, whether the last pytest process was started)."""
    import os
    import signal

    marker = tmp_path / "last-started"
    script, last = tmp_path / "runner.py", tmp_path / "last.py"
    last.write_text(f"open({str(marker)!r}, 'w').close()\n")
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
        "import run_tests\n"
        "half = [sys.executable, '-c', 'import time; time.sleep(60)']\n"
        f"last = [sys.executable, {str(last)!r}]\n"
        "run_tests.commands = lambda args: (half, half, last)\n"
        "sys.exit(run_tests.main([]))\n")
    runner = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert runner.stdout.readline().startswith("make test: ")   # both halves are running
        time.sleep(0.5)
        began = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(runner.pid, signum)   # the terminal's Ctrl-C reaches the whole group
        else:
            runner.send_signal(signum)
        rc = runner.wait(timeout=60)
        took = time.monotonic() - began
        time.sleep(0.5)   # a last process started at the end has had time to write its marker
        return rc, took, marker.exists()
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()


def test_a_stopped_run_starts_no_last_process(tmp_path):
    """A CI timeout's SIGTERM or a Ctrl-C while both halves run stops the run: the last
    (tests/e2e/test_verify_quick.py, ~2 min of its own meshes) is not started after the
    halves ended (review27: it was, and ran to its end, out of the signal's reach)."""
    import signal

    for signum in (signal.SIGTERM, signal.SIGINT):
        rc, took, last_started = _runner_stopped_by(signum, tmp_path)
        assert not last_started, f"{signal.Signals(signum).name}: the last pytest process was started"
        assert rc != 0 and took < 30, (signum, rc, took)
