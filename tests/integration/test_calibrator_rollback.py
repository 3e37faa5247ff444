"""Calibrator rollback on real SQLite and PostgreSQL (``database`` fixture): every fitted
version stays stored; a rollback puts an earlier one (or none) in force, holds automatic
refits until released, is versioned (compare-and-swap) and audited, survives a restart."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client import REGISTRY

from services.common.errors import InvalidArgument, NotFound
from services.common.identity import Principal, Role
from services.feedback.app import FeedbackApp, FeedbackPolicy
from services.feedback.domain.signals import SignalKind
from services.feedback.peers import RecordingAuditor
from services.feedback.store import FeedbackStore, PredictionRecord

ADMIN = Principal("ops-alice", Role.ADMIN)
NOW = time.time()


def make_app(database) -> FeedbackApp:
    store = FeedbackStore(database)
    store.migrate()
    return FeedbackApp(store, FeedbackPolicy(recalibrate_min_new=20), auditor=RecordingAuditor())


def add_feedback(app: FeedbackApp, start: int, count: int, variant: str = "kmeans") -> None:
    """``count`` predictions of ``variant`` at confidence 0.9 of which ~half are wrong."""
    for i in range(start, start + count):
        pid = f"{variant}-{i}"
        app.intake.record_predictions([PredictionRecord(pid, f"acc-{i % 7}", f"s-{pid}", "p1", {"p1": 0.9, "p2": 0.1},
                                                 variant, 1, NOW - 3600, False, 2)])
        wrong = i % 2 == 0
        app.intake.record_feedback(f"f-{pid}", pid, SignalKind.PROFILE_CORRECTED if wrong else SignalKind.PROFILE_CONFIRMED,
                            "p2" if wrong else None, NOW - 60)


def test_rollback_puts_an_earlier_version_in_force_and_holds_refits_until_released(database):
    app = make_app(database)
    add_feedback(app, 0, 30)
    assert set(app.calibration.recalibrate_if_due()) == {"kmeans"}
    add_feedback(app, 30, 30)
    assert set(app.calibration.recalibrate_if_due()) == {"kmeans"}
    history = app.calibration.choices.history("kmeans")
    assert (history.current_version, history.held, [v.version for v in history.versions]) == (2, False, [2, 1])
    assert [v.n for v in history.versions] == [60, 30]
    v1_json = app.store.calibrator_versions("kmeans")[1].calibrator_json

    choice = app.calibration.choices.activate("kmeans", 1, True, "v2 fitted on a bad week", ADMIN)
    assert (choice.version, choice.previous_version, choice.choice_version) == (1, 2, 1)
    version, calibrator = app.calibration.calibrator_for("kmeans")
    assert version == 1 and calibrator.to_json() == app.store.calibrator_versions("kmeans")[1].calibrator_json
    assert app.calibration.calibrator_version() == "kmeans:1"
    assert json.loads(v1_json)["version"] == 1

    # Held: neither the schedule nor a cohort trigger's recalibration replaces it.
    add_feedback(app, 60, 40)
    def held_count() -> float:
        return REGISTRY.get_sample_value("hearth_calibrator_refits_held_total", {"variant": "kmeans"}) or 0.0
    held_before = held_count()
    assert app.calibration.recalibrate_if_due() == {} and app.calibration.recalibrate() == {}
    assert held_count() == held_before + 2  # each held-back refit is counted for operators
    assert app.calibration.calibrator_for("kmeans")[0] == 1
    assert [v.version for v in app.calibration.choices.history("kmeans").versions] == [2, 1]

    # A restart keeps the choice and the hold.
    restarted = make_app(database)
    held = restarted.calibration.choices.history("kmeans")
    assert (held.current_version, held.held, held.choice_version, held.reason) == (
        1, True, 1, "v2 fitted on a bad week")
    assert restarted.calibration.recalibrate_if_due() == {}

    # Release: the version in force stays until the next due refit, which then runs.
    released = restarted.calibration.choices.activate("kmeans", 1, False, "bad week understood", ADMIN)
    assert (released.version, released.previous_version, released.choice_version) == (1, 1, 2)
    assert set(restarted.calibration.recalibrate_if_due()) == {"kmeans"}
    after = restarted.calibration.choices.history("kmeans")
    assert (after.current_version, after.held) == (3, False)

    # Audited through the flag-change hook, one record per choice, with reason and principal.
    audited = app.experiments.auditor.changes + restarted.experiments.auditor.changes
    assert [(c.experiment, c.version, c.reason, c.principal.id) for c in audited] == [
        ("calibrator:kmeans", 1, "v2 fitted on a bad week", "ops-alice"),
        ("calibrator:kmeans", 2, "bad week understood", "ops-alice")]
    assert json.loads(audited[0].flags_json) == {"version": 1, "hold": True, "previous_version": 2}
    assert restarted.store.current_flags("calibrator:kmeans").audit_result == "OK"
    # The experiment's own flags are untouched by calibrator choices.
    assert app.experiments.flags().version == 0


def test_rollback_to_none_applies_the_raw_confidences(database):
    app = make_app(database)
    add_feedback(app, 0, 30)
    app.calibration.recalibrate_if_due()
    assert app.calibration.calibrator_for("kmeans")[0] == 1
    choice = app.calibration.choices.activate("kmeans", 0, True, "identity until refit is fixed", ADMIN)
    assert (choice.version, choice.previous_version) == (0, 1)
    assert app.calibration.calibrator_for("kmeans")[0] == 0
    assert app.calibration.apply_calibration("kmeans", [[0.9, 0.1]]).tolist() == [[0.9, 0.1]]
    history = app.calibration.choices.history("kmeans")
    assert (history.current_version, history.held, len(history.versions)) == (0, True, 1)
    add_feedback(app, 30, 30)
    assert app.calibration.recalibrate_if_due() == {}
    # Roll forward again to the stored version.
    assert app.calibration.choices.activate("kmeans", 1, False, "forward", ADMIN).version == 1
    assert app.calibration.calibrator_for("kmeans")[0] == 1


@pytest.mark.parametrize("variant, version, reason, error, field", [
    ("kmeans", 7, "r", NotFound, "version"),
    ("dbscan", 0, "r", NotFound, "variant"),
    ("", 1, "r", InvalidArgument, "variant"),
    ("kmeans", -1, "r", InvalidArgument, "version"),
    ("kmeans", 1, " ", InvalidArgument, "reason"),
    ("kmeans", 1, "x" * 501, InvalidArgument, "reason"),
])
def test_bad_choices_are_refused_naming_the_field_and_change_nothing(database, variant, version, reason, error,
                                                                     field):
    app = make_app(database)
    add_feedback(app, 0, 30)
    app.calibration.recalibrate_if_due()
    with pytest.raises(error) as info:
        app.calibration.choices.activate(variant, version, True, reason, ADMIN)
    assert info.value.field == field
    history = app.calibration.choices.history("kmeans")
    assert (history.current_version, history.held, history.choice_version) == (1, False, 0)
    assert app.experiments.auditor.changes == []


def test_listing_an_unknown_variant_is_not_found(database):
    app = make_app(database)
    with pytest.raises(NotFound) as info:
        app.calibration.choices.history("dbscan")
    assert info.value.field == "variant"
    assert app.calibration.choices.history("gmm").versions == []  # known, nothing fitted yet


def test_calibrator_versions_no_rollback_needs_are_purged_at_the_next_fit(database):
    """Every fitted version stayed stored for ever (session 31's "Left"; up to 288 a day at
    the fastest schedule). Now a fit keeps the one in force, the newest 20 and the newest of
    each day of the last 30 (services/feedback/domain/calibrator_versions.py); a rollback to
    a purged version is refused naming it, to a kept one works, and the numbering goes on."""
    app = make_app(database)
    store, day = app.store, 86400.0
    now = float(int(NOW // day) * day + day / 2)   # noon UTC: the day buckets below are whole days
    body = json.dumps({"method": "temperature", "training": {"n": 1}, "version": 0})
    fits = ([now - (40 - i) * day for i in range(10)]                 # v1-10: 40..31 days ago
            + [now - 15 * day - day / 4 + i * day / 2 for i in range(30)]   # v11-40: 06:00 and 18:00, 15..1 days ago
            + [now - 3600 + i * 60 for i in range(30)])               # v41-70: the last hour
    for version, fitted_at in enumerate(fits, start=1):
        assert store.save_calibrator("kmeans", version, body, fitted_at)
    kept = sorted(v.version for v in store.calibrator_versions("kmeans"))
    daily = [12 + 2 * i for i in range(15)]     # the later fit of each of the 15 days
    assert kept == sorted(set(daily) | set(range(51, 71))), kept
    assert app.calibration.calibrator_version() == "kmeans:70"
    with pytest.raises(NotFound) as err:
        app.calibration.choices.activate("kmeans", 11, True, "before the bad stretch", ADMIN)
    assert err.value.field == "version"
    assert app.calibration.choices.activate("kmeans", 12, True, "before the bad stretch", ADMIN).version == 12
    assert store.next_calibrator_version("kmeans") == 71
    # Fits months later: the version in force when one purges stays; then only the newest 20.
    assert store.save_calibrator("kmeans", 71, body, now + 100 * day)
    assert 12 in {v.version for v in store.calibrator_versions("kmeans")}
    for version in range(72, 96):
        assert store.save_calibrator("kmeans", version, body, now + 100 * day)
    assert sorted(v.version for v in store.calibrator_versions("kmeans")) == list(range(76, 96))


def test_an_activation_beside_the_purge_of_its_version_is_refused_not_left_pointing_at_nothing(database):
    """A fit's purge deletes old versions while a rollback may be choosing one. The purge's
    delete not yet committed, the activation read the version as stored (PostgreSQL, read
    committed), pointed the variant at it and committed: once the purge committed the variant
    pointed at nothing (GetCalibrator: identity). Now the activation's read waits for the
    purge (FOR SHARE) and finds the version gone: NotFound naming it, the pointer unmoved."""
    import threading

    from tests.helpers.held_transaction import transaction_held_open

    app = make_app(database)
    body = json.dumps({"method": "temperature", "training": {"n": 1}, "version": 0})
    for version in (1, 2):
        assert app.store.save_calibrator("kmeans", version, body, NOW)
    outcome: dict[str, object] = {}

    def rollback() -> None:
        try:
            outcome["choice"] = app.calibration.choices.activate("kmeans", 1, True, "back to v1", ADMIN)
        except NotFound as exc:
            outcome["refused"] = exc

    thread = threading.Thread(target=rollback)
    with transaction_held_open(database, lambda tx: tx.execute(
            "DELETE FROM calibrators WHERE variant = 'kmeans' AND version = 1")):   # the purge, uncommitted
        thread.start()
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:   # until the rollback waits for it
            if database.dialect == "postgres":
                with database.transaction(readonly=True) as tx:
                    if tx.query("SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0]:
                        break
            elif time.monotonic() > deadline - 9.5:
                break   # SQLite: its writers wait for the write lock, unseen from outside
            time.sleep(0.02)
    thread.join(30)
    assert "refused" in outcome and outcome["refused"].field == "version", outcome
    assert app.calibration.calibrator_version() == "kmeans:2"
