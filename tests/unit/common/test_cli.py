"""The `hearth` entry point dispatches to each service's tools."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from services.cli import build_parser, main


def test_every_subcommand_is_registered():
    choices = build_parser()._subparsers._group_actions[0].choices
    assert {"attribute", "verify-receipt", "audit", "report"} <= set(choices)


def test_attribute_through_the_hearth_command(tmp_path: Path, capsys):
    paths = tmp_path / "paths.csv"
    paths.write_text("path;total_conversions;total_conversion_value;total_null\n"
                     "a > b;2;10;1\nb;1;5;3\n")
    assert main(["attribute", str(paths), "--method", "shapley", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    credit = {c["channel"]: c["conversions"] for c in out["channels"]}
    assert credit == {"a": 1.0, "b": 2.0}   # a>b's 2 conversions split evenly, b's 1 to b


def test_installed_console_script_runs(tmp_path: Path):
    script = Path(sys.executable).with_name("hearth")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "attribute" in result.stdout
    # Real work through the installed script, and its exit codes: an attribution whose
    # credit is known, then a bad file (exit 2, the error on stderr, nothing on stdout).
    paths = tmp_path / "paths.csv"
    paths.write_text("path;total_conversions;total_conversion_value;total_null\n"
                     "a > b;2;10;1\nb;1;5;3\n")
    result = subprocess.run([str(script), "attribute", str(paths), "--method", "shapley", "--format", "json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    credit = {c["channel"]: c["conversions"] for c in json.loads(result.stdout)["channels"]}
    assert credit == {"a": 1.0, "b": 2.0}
    bad = tmp_path / "bad.csv"
    bad.write_text("not;a;path;file\n")
    result = subprocess.run([str(script), "attribute", str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.strip()


def test_each_command_is_registered_by_the_module_the_table_names():
    """COMMAND_MODULES is how `hearth X` finds X without importing every tool: a command
    missing from it, or named with the wrong module, would not parse."""
    import importlib
    import argparse

    from services.cli import COMMAND_MODULES

    everything = set(build_parser()._subparsers._group_actions[0].choices)
    assert everything == set(COMMAND_MODULES)
    for command, module in COMMAND_MODULES.items():
        only = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(only)
        assert command in only.choices, (command, module)
        assert set(build_parser(command)._subparsers._group_actions[0].choices) == set(only.choices)


def test_a_command_imports_only_its_own_tool():
    """`hearth calibrator ...` (the rollout tools, a CronJob's and a webhook's command) does
    not load the attribution and backup tools — NumPy, SciPy, the storage drivers."""
    probe = ("import sys\n"
             "from services.cli import main\n"
             "try:\n    main(['calibrator', 'list', '--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('services.attribution.cli', 'services.privacy.backup', 'scipy', 'numpy')"
             " if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[3])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
