"""A rollback made while a refit of its variant runs (review32, session 32), on real SQLite and
PostgreSQL. ``Calibration.recalibrate`` reads which variants are held, fits (seconds on a big
label window), then stores its version and points the variant at it. An operator's rollback
with hold committed in between was undone by that save: the pointer moved to the new version
while the choice said held, and held stopped every later refit, so the rolled-back calibrator
stayed out of force until someone noticed. Now the save re-reads the hold inside its
transaction (serialised with activations on PostgreSQL) and stores nothing when held."""

from __future__ import annotations

from tests.integration.test_calibrator_rollback import ADMIN, add_feedback, make_app


def test_a_rollback_made_while_a_refit_runs_is_not_undone_by_it(database):
    app = make_app(database)
    for start in (0, 30):   # versions 1 and 2; 2 turns out bad
        add_feedback(app, start, 30)
        assert set(app.calibration.recalibrate_if_due()) == {"kmeans"}
    add_feedback(app, 60, 30)
    next_version = app.store.next_calibrator_version
    rollbacks = []

    def rollback_meanwhile(variant: str) -> int:
        # The refit has read the held variants and is fitting: the operator rolls back now.
        if not rollbacks:
            rollbacks.append(app.calibration.choices.activate("kmeans", 1, True, "v2 was bad", ADMIN))
        return next_version(variant)

    app.store.next_calibrator_version = rollback_meanwhile
    assert app.calibration.recalibrate_if_due() == {}       # the fit is not stored
    assert [c.version for c in rollbacks] == [1]
    history = app.calibration.choices.history("kmeans")
    assert (history.current_version, history.held) == (1, True), history
    assert [v.version for v in history.versions] == [2, 1]  # version 3 not stored
    assert app.calibration.calibrator_version() == "kmeans:1"
