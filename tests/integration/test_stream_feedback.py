"""Feedback on a streamed household, through the service (ClusteringApp.record_labels ->
ModelKeeper.refresh(force="labels")), on real stores: a stream is not refitted — the
labels bind to its persons and every other session keeps its person and probability (a
full refit mid-stream answered the household worse than no feedback) — and a label given
before the first fit names a person of that fit with the id the caller gave."""

from __future__ import annotations

import numpy as np

from services.clustering.app import ClusteringApp
from services.clustering.domain.model import MIN_SESSIONS
from services.clustering.modeling import ModelKeeper
from services.clustering.store import ClusteringStore
from tests.helpers.households import household_events, week_start_days_ago

T0 = week_start_days_ago(90)
PERSONS = ("kid", "parent", "teen")


def _app(database) -> ClusteringApp:
    store = ClusteringStore(database)
    store.migrate()
    return ClusteringApp(store, keeper=ModelKeeper(store, lambda _a: "gmm"), background=False)


def _stream(app: ClusteringApp, account: str, days: range, seed: int) -> None:
    """The household's events arrive day by day, each day's folded in as it comes."""
    events, _ = household_events(account, PERSONS, days=days.stop, start_ts=T0, seed=seed)
    for day in days:
        lo, hi = T0 + day * 86400, T0 + (day + 1) * 86400
        app.store.ingest([e for e in events if lo <= e.ts < hi])
        app.keeper.refresh(account)


def test_feedback_on_a_stream_binds_to_its_persons_and_leaves_the_rest(database):
    app = _app(database)
    _stream(app, "acc-s", range(30), seed=4)
    version, envelope = app.keeper.load("acc-s")
    assert envelope.model.streamed and envelope.model.n_persons >= 2
    stats = envelope.model.mixture.stats.copy()
    before, _ = app.household("acc-s", 1000)
    person_of = {s.session_id: s.person_id for s in before.sessions}
    confirmed, corrected = before.sessions[-1], before.sessions[-2]
    other = next(p for p in envelope.model.person_ids if p != corrected.person_id)
    labels = [("acc-s", confirmed.session_id, confirmed.person_id, "feedback:profile_confirmed"),
              ("acc-s", corrected.session_id, other, "feedback:profile_corrected")]
    assert app.record_labels(labels) == (2, 0)
    version_after, envelope = app.keeper.load("acc-s")
    assert version_after == version + 1 and envelope.model.streamed
    np.testing.assert_array_equal(envelope.model.mixture.stats, stats)      # not refitted
    after, _ = app.household("acc-s", 1000)
    stored = {s.session_id: s.person_id for s in after.sessions}
    assert stored[confirmed.session_id] == confirmed.person_id and stored[corrected.session_id] == other
    assert after.person_probability[corrected.session_id] == 1.0
    others = [s for s in after.sessions if s.session_id not in (confirmed.session_id, corrected.session_id)]
    assert others and all(stored[s.session_id] == person_of[s.session_id] for s in others)


def test_a_label_before_the_first_fit_keeps_the_callers_person_id(database):
    app = _app(database)
    events, _ = household_events("acc-c", PERSONS, days=20, start_ts=T0, seed=5)
    app.store.ingest([e for e in events if e.ts < T0 + 86400])
    app.keeper.refresh("acc-c")
    first = app.store.closed_sessions("acc-c")
    assert 0 < len(first) < MIN_SESSIONS
    # the caller says the first session is person "p7" (a person the household has not named)
    assert app.record_labels([("acc-c", first[0].session_id, "p7", "feedback:profile_corrected")]) == (1, 0)
    _, envelope = app.keeper.load("acc-c")
    assert envelope.model.active_variant == "cold_start"
    for day in range(1, 20):
        lo, hi = T0 + day * 86400, T0 + (day + 1) * 86400
        app.store.ingest([e for e in events if lo <= e.ts < hi])
        app.keeper.refresh("acc-c")
    _, envelope = app.keeper.load("acc-c")
    assert envelope.model.active_variant == "gmm" and "p7" in envelope.model.person_ids
    stored = {s.session_id: s.person_id for s in app.store.closed_sessions("acc-c")}
    assert stored[first[0].session_id] == "p7"
    assert app.assign("acc-c", session_id=first[0].session_id).probabilities["p7"] == 1.0


def test_a_label_naming_a_person_the_stream_lacks_shows_at_once_and_keeps_its_id(database):
    app = _app(database)
    _stream(app, "acc-n", range(30), seed=6)
    version, envelope = app.keeper.load("acc-n")
    assert envelope.model.streamed
    stats = envelope.model.mixture.stats.copy()
    assert "p42" not in envelope.model.person_ids
    before, _ = app.household("acc-n", 1000)
    person_of = {s.session_id: s.person_id for s in before.sessions}
    by_id, by_name = before.sessions[-1], before.sessions[-3]
    # a caller's id the household has never had, and a name (a new member) on another session
    labels = [("acc-n", by_id.session_id, "p42", "feedback:profile_corrected"),
              ("acc-n", by_name.session_id, "grandma", "feedback:profile_corrected")]
    assert app.record_labels(labels) == (2, 0)
    _, envelope = app.keeper.load("acc-n")
    assert envelope.model.streamed                                          # still not refitted
    np.testing.assert_array_equal(envelope.model.mixture.stats, stats)
    grandma = envelope.model.label_map["grandma"]
    assert grandma not in person_of.values() and grandma != "p42" and grandma not in envelope.model.person_ids
    after, extras = app.household("acc-n", 1000)
    listed = {p["person_id"]: p for p in extras.persons}
    assert listed["p42"]["sessions"] == 1 and listed[grandma]["sessions"] == 1      # listed, sessions counted
    assert extras.n_persons == envelope.model.n_persons + 2 == len(extras.persons)
    stored = {s.session_id: s.person_id for s in after.sessions}
    assert stored[by_id.session_id] == "p42" and after.person_probability[by_id.session_id] == 1.0
    assert stored[by_name.session_id] == grandma and after.person_probability[by_name.session_id] == 1.0
    others = [s for s in after.sessions if s.session_id not in (by_id.session_id, by_name.session_id)]
    assert others and all(stored[s.session_id] == person_of[s.session_id] for s in others)
    answer = app.assign("acc-n", session_id=by_name.session_id)
    assert answer.person_id == grandma and answer.probabilities == {grandma: 1.0}
    # the next full refit gives the labelled persons the ids the household already showed
    app.refit("acc-n", "requested")
    _, envelope = app.keeper.load("acc-n")
    assert not envelope.model.streamed and envelope.model.label_map["grandma"] == grandma
    view, extras = app.household("acc-n", 1000)
    refitted = {s.session_id: s.person_id for s in view.sessions}
    assert refitted[by_id.session_id] == "p42" and refitted[by_name.session_id] == grandma
    listed = [p["person_id"] for p in extras.persons]
    assert listed.count("p42") == 1 and listed.count(grandma) == 1 and extras.n_persons == len(listed)


def test_erasing_a_person_only_a_label_named_takes_their_session_and_their_id(database):
    from services.common.erasure import ErasureScope
    app = _app(database)
    _stream(app, "acc-e", range(30), seed=7)
    before, _ = app.household("acc-e", 1000)
    named = before.sessions[-2]
    assert app.record_labels([("acc-e", named.session_id, "p42", "feedback:profile_corrected")]) == (1, 0)
    assert {s.session_id: s.person_id for s in app.household("acc-e", 1000)[0].sessions}[named.session_id] == "p42"
    outcome = app.erase(ErasureScope("acc-e", "person", person_id="p42"))
    assert outcome.deleted_counts["sessions"] == 1                       # only the session the label named
    after, extras = app.household("acc-e", 1000)
    assert named.session_id not in {s.session_id for s in after.sessions}
    assert len(after.sessions) == len(before.sessions) - 1
    assert "p42" not in {p["person_id"] for p in extras.persons} | {s.person_id for s in after.sessions}
    _, envelope = app.keeper.load("acc-e")
    assert "p42" in envelope.model.retired and envelope.model.reserved_person_ids() == []
    # the id never comes back: a later label naming it is a name, given a new id
    other = after.sessions[-1]
    app.record_labels([("acc-e", other.session_id, "p42", "feedback:profile_corrected")])
    shown = {s.session_id: s.person_id for s in app.household("acc-e", 1000)[0].sessions}[other.session_id]
    assert shown != "p42" and shown.startswith("p")


def test_a_volunteered_label_is_marked_for_the_fit(database):
    """RecordLabels' source ending in ":unprompted" (feedback forwards a volunteered
    correction so) reaches the fit as ``volunteered`` (HouseholdModel._labels_add_persons
    then lets it name a person without sizing it); other labels are not marked."""
    from services.common.feedback_to_clustering import feedback_label_source
    app = _app(database)
    events, _ = household_events("acc-u", PERSONS, days=20, start_ts=T0, seed=8)
    app.store.ingest(events)
    app.keeper.refresh("acc-u")
    sessions = app.store.closed_sessions("acc-u")
    assert app.keeper.snapshot("acc-u").volunteered is None
    app.record_labels([("acc-u", sessions[3].session_id, "p42", feedback_label_source("profile_corrected", True)),
                       ("acc-u", sessions[5].session_id, "p1", feedback_label_source("profile_confirmed", False))])
    snap = app.keeper.snapshot("acc-u")
    assert np.flatnonzero(snap.volunteered).tolist() == [3] and snap.labels[3] == "p42" and snap.labels[5] == "p1"
    _, envelope = app.keeper.load("acc-u")
    assert "p42" in envelope.model.person_ids          # fitted at once: the label refits it, naming p42


def test_a_feedback_triggers_refit_binds_a_stream_and_a_requested_one_refits(database):
    """The feedback service's household trigger (3 of the last 5 answers said wrong) asks
    for a Refit: a stream is not refitted for it (its labels are bound already), as for
    the labels themselves; an operator's Refit still refits in full."""
    from services.common.feedback_to_clustering import feedback_trigger_reason
    app = _app(database)
    _stream(app, "acc-t", range(30), seed=4)
    version, envelope = app.keeper.load("acc-t")
    assert envelope.model.streamed and envelope.model.binds_labels
    stats = envelope.model.mixture.stats.copy()
    app.refit("acc-t", feedback_trigger_reason(7, ": disagreement 3 >= 3 over 5 feedback items"))
    _, kept = app.keeper.load("acc-t")
    assert kept.model.streamed and kept.included == envelope.included
    np.testing.assert_array_equal(kept.model.mixture.stats, stats)      # not refitted
    app.refit("acc-t", "requested by an operator")
    _, refitted = app.keeper.load("acc-t")
    assert not refitted.model.streamed and refitted.model.folded_in == 0
