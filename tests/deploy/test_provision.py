"""scripts/provision.sh, which `make test` and .ci/run run first: on a machine missing the
system tools it installs them with apt-get as root, or prints the one command to run and
fails when not root; with everything present it changes nothing.

The script runs under a PATH that holds only shims: ``id`` reports the uid under test,
``apt-get``/``useradd`` record their arguments (and apt-get "installs" by creating the
binaries a package provides). The real apt path was exercised in a throwaway overlay root
(docs/operations.md, "Provisioning a fresh machine").
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "provision.sh"
PROVIDES = {"redis-server": "redis-server", "prometheus": "promtool", "npm": "npm", "postgresql": "initdb",
            "g++": "g++", "git": "git"}


def _shim(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _machine(tmp_path: Path, uid: int, present: set[str], postgres_user: bool) -> tuple[Path, dict]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for tool in present:
        _shim(bin_dir / tool, "exit 0\n")
    os.symlink(sys.executable, bin_dir / "python3")
    user_flag = tmp_path / "postgres-user"
    if postgres_user:
        user_flag.touch()
    _shim(bin_dir / "id", f"""
if [ "$1" = -u ]; then echo {uid}; exit 0; fi
if [ "$1" = postgres ]; then [ -e {user_flag} ] && exit 0; exit 1; fi
exit 1
""")
    provides = " ".join(f"[{k}]={v}" for k, v in PROVIDES.items())
    _shim(bin_dir / "apt-get", f"""
echo "apt-get $* DEBIAN_FRONTEND=$DEBIAN_FRONTEND" >> {log}
declare -A provides=({provides})
if [ "$1" = install ]; then
  for arg in "$@"; do
    [ -n "${{provides[$arg]:-}}" ] && printf '#!/bin/bash\\nexit 0\\n' > {bin_dir}/${{provides[$arg]}} \\
      && /bin/chmod +x {bin_dir}/${{provides[$arg]}}
  done
fi
exit 0
""")
    _shim(bin_dir / "useradd", f'echo "useradd $*" >> {log}; /bin/touch {user_flag}\n')
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    return log, env


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("bash"), str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_root_installs_what_is_missing_with_apt_then_is_a_no_op(tmp_path):
    log, env = _machine(tmp_path, uid=0, present={"npm"}, postgres_user=False)
    done = _run(env)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("apt-get update -qq")  # update first
    install = calls[1].split()
    assert install[:3] == ["apt-get", "install", "-y"] and "DEBIAN_FRONTEND=noninteractive" in install
    assert {"redis-server", "prometheus", "git"} <= set(install) and "npm" not in install
    assert calls[2] == "useradd --system --no-create-home postgres"
    assert "redis-server" in done.stderr  # says what it installs

    log.unlink()
    again = _run(env)  # idempotent: everything is there now
    assert again.returncode == 0 and not log.exists(), (again.stderr, log.read_text() if log.exists() else "")


def test_user_the_postgresql_package_created_is_not_added_again(tmp_path):
    """Debian's postgresql package creates the postgres user when it is installed; on a machine
    with neither, useradd after apt-get failed with "already exists" and stopped make test."""
    log, env = _machine(tmp_path, uid=0, present={"npm", "promtool", "g++", "git"}, postgres_user=False)
    # The install creates the user, as Debian's postgresql package does (this machine's own
    # PostgreSQL binaries are found by the script's glob, so another missing package stands in).
    apt = Path(env["PATH"]) / "apt-get"
    body = apt.read_text().rstrip().removesuffix("exit 0")
    apt.write_text(body + f'[ "$1" = install ] && /bin/touch {tmp_path / "postgres-user"}\nexit 0\n')
    done = _run(env)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert any(call.startswith("apt-get install") for call in calls)
    assert not any(call.startswith("useradd") for call in calls)


def test_not_root_prints_the_one_command_and_fails_without_changing_anything(tmp_path):
    log, env = _machine(tmp_path, uid=1000, present={"npm", "promtool"}, postgres_user=False)
    done = _run(env)
    assert done.returncode == 1
    assert not log.exists()  # neither apt-get nor useradd ran
    command = [line for line in done.stderr.splitlines() if line.startswith("    sudo ")]
    assert len(command) == 1 and "apt-get install" in command[0] and "redis-server" in command[0]
    assert "promtool" not in command[0] and "prometheus" not in command[0]


def test_not_root_with_everything_present_passes(tmp_path):
    log, env = _machine(tmp_path, uid=1000, present={"npm", "promtool", "redis-server", "g++", "git"},
                        postgres_user=False)
    done = _run(env)
    assert done.returncode == 0, done.stderr
    assert not log.exists() and done.stderr == ""


def test_venv_scope_installs_only_what_the_virtualenv_needs(tmp_path):
    """`make venv` (and so `make run`) runs `provision.sh venv` first: on a machine with only
    python3 and make it installs the compiler ChannelAttribution's source release needs, and
    leaves the suite's servers and the postgres user to `make test`."""
    log, env = _machine(tmp_path, uid=0, present=set(), postgres_user=False)
    done = _run(env, "venv")
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    install = calls[1].split()
    assert "g++" in install
    assert not {"redis-server", "prometheus", "npm", "postgresql", "git"} & set(install)
    assert not any(call.startswith("useradd") for call in calls)

    log.unlink()
    assert _run(env, "venv").returncode == 0 and not log.exists()  # g++ is there now: a no-op


def test_unknown_scope_is_refused(tmp_path):
    log, env = _machine(tmp_path, uid=0, present=set(), postgres_user=False)
    done = _run(env, "everything")
    assert done.returncode == 2 and "usage" in done.stderr and not log.exists()


def test_make_test_and_ci_run_both_provision_with_this_script():
    makefile = (ROOT / "Makefile").read_text()
    test_rule = next(line for line in makefile.splitlines() if line.startswith("test:"))
    assert test_rule.split(":")[1].split()[0] == "provision"
    assert "bash scripts/provision.sh" in makefile
    venv_rule = makefile.split("$(STAMP): pyproject.toml", 1)[1].split("\n\n", 1)[0]
    assert venv_rule.index("bash scripts/provision.sh venv") < venv_rule.index("-m venv")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/provision.sh" in ci and "apt-get" not in ci
    assert "HEARTH_SHARED_DATA" in ci
