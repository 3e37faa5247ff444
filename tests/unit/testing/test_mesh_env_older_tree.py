"""A mesh whose processes run another commit's tree (a rolling upgrade's release before, a
bench baseline) hands them only the HEARTH_* variables of the environment that tree reads:
an unknown one stops each of its processes at start-up (config.check_environment), and the
test run sets variables newer than those trees (tests/conftest.py HEARTH_ERASURE_FENCE_S)."""

from __future__ import annotations

from services.testing.mesh import ROOT, Mesh, reads_variable


def _tree(root, settings: str):
    (root / "services" / "clustering").mkdir(parents=True)
    (root / "services" / "clustering" / "settings.py").write_text(settings, encoding="utf-8")
    (root / "gateway").mkdir()
    return root


def test_an_older_trees_processes_get_only_the_variables_it_reads(tmp_path, monkeypatch):
    old = _tree(tmp_path / "old", "class S:\n    retention_check_s: float = 3600\n")
    monkeypatch.setenv("HEARTH_ERASURE_FENCE_S", "0.5")
    monkeypatch.setenv("HEARTH_RETENTION_CHECK_S", "0")
    monkeypatch.setenv("NOT_HEARTHS", "kept")
    mesh = Mesh(tmp_path / "var", extra_env={"HEARTH_TRACE_EXPORT": "none"}, root=old)
    env = mesh.env()
    assert "HEARTH_ERASURE_FENCE_S" not in env
    assert (env["HEARTH_RETENTION_CHECK_S"], env["NOT_HEARTHS"]) == ("0", "kept")
    assert env["HEARTH_TRACE_EXPORT"] == "none"   # what the mesh sets itself is its own choice
    assert env["HEARTH_DATA_DIR"] == str(tmp_path / "var")


def test_this_trees_processes_get_the_whole_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTH_ERASURE_FENCE_S", "0.5")
    assert Mesh(tmp_path / "var").env()["HEARTH_ERASURE_FENCE_S"] == "0.5"
    assert reads_variable(ROOT, "HEARTH_ERASURE_FENCE_S") and not reads_variable(ROOT, "HEARTH_NO_SUCH_SETTING")
