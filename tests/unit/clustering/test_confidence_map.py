"""The confidence map says how sure an answer is, never who it is."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from services.clustering.domain.model import calibrate_confidence


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(0.01, 1.0), min_size=3, max_size=6), min_size=1, max_size=20),
       st.booleans(), st.booleans(), st.booleans())
def test_the_map_keeps_the_answer_and_a_distribution(rows, device, young, streamed):
    width = max(len(r) for r in rows)
    P = np.array([r + [0.0] * (width - len(r)) for r in rows])
    P /= P.sum(axis=1, keepdims=True)
    P[np.arange(len(P)), P.argmax(axis=1)] += 1e-6   # a strict top (ties are the caller's)
    P /= P.sum(axis=1, keepdims=True)
    out = calibrate_confidence(P, (P > 0).sum(axis=1), device=device, young=young, streamed=streamed)
    np.testing.assert_array_equal(out.argmax(axis=1), P.argmax(axis=1))
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-9)
    assert not out[P == 0].any()


def test_a_low_map_value_with_three_persons_does_not_hand_the_answer_to_the_runner_up():
    # top 0.40, runner-up 0.35: the map may say 0.34 (>= 1/3), and rescaling the rest
    # would have made the runner-up 0.385 > 0.34 — the answer changed person.
    P = np.array([[0.40, 0.35, 0.25]])
    out = calibrate_confidence(P, np.array([3]), device=True, young=True)
    assert out.argmax() == 0 and out[0, 0] > out[0, 1]


def _two_people_with_phones_and_a_tv(seed: int = 5):
    """Two people, each on their own phone, who also both watch on the shared TV."""
    from tests.unit.clustering.test_identity_signals import household, persona_sessions
    rng = np.random.default_rng(seed)
    parts = [(*persona_sessions(rng, 60, 60, 8, "mobile", {"news": 1}), "phone-a", 0),
             (*persona_sessions(rng, 60, 60, 21, "mobile", {"drama": 1}), "phone-b", 1),
             (*persona_sessions(rng, 30, 60, 8, "tv", {"news": 1}), "tv", 0),
             (*persona_sessions(rng, 30, 60, 21, "tv", {"drama": 1}), "tv", 1)]
    _, X, dev, _ = household(parts)
    return X, dev


def _constant_maps(monkeypatch) -> dict[str, float]:
    """Every device map replaced by a flat one with its own value: an answer's confidence
    then says which map it went through."""
    from services.clustering.domain import model as M
    values = {name: 0.51 + 0.04 * i for i, name in enumerate(M.DEVICE_CONFIDENCE_MAPS)}
    monkeypatch.setattr(M, "DEVICE_CONFIDENCE_MAPS",
                        {name: ([0.0, 1.0], [v, v]) for name, v in values.items()})
    return values


def test_a_fit_on_every_session_and_a_stream_answer_through_their_own_maps(monkeypatch):
    """Which map answers is what the model knows: its age, whether it has folded sessions
    in since its last full fit (streamed)."""
    from services.clustering.domain.model import HouseholdModel
    values = _constant_maps(monkeypatch)
    X, dev = _two_people_with_phones_and_a_tv()
    fitted = HouseholdModel().fit(X, device_ids=dev)
    assert fitted.n_persons == 2 and fitted.folded_in == 0
    np.testing.assert_allclose(fitted.assign_batch(X, device_ids=dev).confidence, values["fitted"])

    # a household imported at once and then followed: a few sessions folded into the
    # fit do not make it a stream's model; once the stream outweighs the import they do
    streamed = HouseholdModel().fit(X[:80], device_ids=dev[:80])
    streamed.update(X[80:90], device_ids=dev[80:90])
    assert streamed.folded_in == 10 and not streamed.streamed
    np.testing.assert_allclose(streamed.assign_batch(X, device_ids=dev).confidence, values["fitted"])
    for a in range(90, X.shape[0], 5):
        streamed.update(X[a:a + 5], device_ids=dev[a:a + 5])
    assert streamed.folded_in == X.shape[0] - 80 > 80 and streamed.streamed and streamed.n_persons == 2
    np.testing.assert_allclose(streamed.assign_batch(X, device_ids=dev).confidence, values["streamed"])

    young = HouseholdModel().fit(X[:40], device_ids=dev[:40])
    if young.n_persons > 1:
        np.testing.assert_allclose(young.assign_batch(X[:40], device_ids=dev[:40]).confidence, values["young"])
    # a full refit makes it a fitted model again
    streamed.fit(X, device_ids=dev)
    assert streamed.folded_in == 0 and not streamed.streamed
    np.testing.assert_allclose(streamed.assign_batch(X, device_ids=dev).confidence, values["fitted"])


def test_how_the_model_came_about_survives_its_bytes():
    from services.clustering.domain.model import HouseholdModel
    X, dev = _two_people_with_phones_and_a_tv()
    m = HouseholdModel().fit(X[:100], device_ids=dev[:100]).update(X[100:110], device_ids=dev[100:110])
    back = HouseholdModel.from_bytes(m.to_bytes())
    assert (back.fit_sessions, back.folded_in) == (100, 10)
    np.testing.assert_allclose(back.assign_batch(X, device_ids=dev).probabilities,
                               m.assign_batch(X, device_ids=dev).probabilities)


def test_a_model_stored_before_it_knew_how_it_came_about_answers_as_streamed(monkeypatch):
    """Bytes without fit_sessions (older format): unknown history, the less sure maps."""
    import io
    import json

    from services.clustering.domain.model import HouseholdModel
    values = _constant_maps(monkeypatch)
    X, dev = _two_people_with_phones_and_a_tv()
    z = dict(np.load(io.BytesIO(HouseholdModel().fit(X, device_ids=dev).to_bytes())))
    meta = json.loads(bytes(z["meta"]).decode())
    del meta["fit_sessions"]
    z["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **z)
    old = HouseholdModel.from_bytes(buf.getvalue())
    assert old.folded_in == X.shape[0] and old.streamed
    np.testing.assert_allclose(old.assign_batch(X, device_ids=dev).confidence, values["streamed"])


def test_a_one_person_answer_of_a_fit_on_every_session_has_its_own_figure():
    from services.clustering.domain.model import (ONE_PERSON_CONFIDENCE, one_person_confidence,
                                                  one_person_evidence, one_person_group)
    assert one_person_group(young=True, streamed=False) == one_person_group(young=False, streamed=False) == "fitted"
    assert one_person_group(young=True, streamed=True) == "young"
    assert one_person_group(young=False, streamed=True) == "mature"
    ev = one_person_evidence(60, 2)   # within the fitted range
    for group, (intercept, coef) in ONE_PERSON_CONFIDENCE.items():
        young, streamed = {"fitted": (False, False), "young": (True, True), "mature": (False, True)}[group]
        expected = 1.0 / (1.0 + np.exp(-(intercept + ev[0] @ np.asarray(coef))))
        np.testing.assert_allclose(one_person_confidence(ev, young, streamed), [expected])


def test_one_person_evidence_outside_what_the_fit_saw_is_judged_at_its_edge():
    from services.clustering.domain.model import (ONE_PERSON_LOG_SESSIONS, ONE_PERSON_MAX_DEVICES,
                                                  one_person_confidence, one_person_evidence)
    ev = one_person_evidence(10**7, 40, n=2)
    assert ev.shape == (2, 2)
    np.testing.assert_allclose(ev[:, 0], np.log(10**7))
    np.testing.assert_allclose(ev[:, 1], ONE_PERSON_MAX_DEVICES)
    at_edge = one_person_evidence(int(round(np.exp(ONE_PERSON_LOG_SESSIONS[1]))), 40, n=2)
    few = one_person_evidence(1, 1)
    low_edge = one_person_evidence(int(round(np.exp(ONE_PERSON_LOG_SESSIONS[0]))), 1)
    for young, streamed in ((False, False), (True, True), (False, True)):
        np.testing.assert_allclose(one_person_confidence(ev, young, streamed),
                                   one_person_confidence(at_edge, young, streamed), rtol=1e-3)
        np.testing.assert_allclose(one_person_confidence(few, young, streamed),
                                   one_person_confidence(low_edge, young, streamed), rtol=1e-3)


def test_a_streamed_model_answers_the_sessions_it_includes_through_the_settled_map(monkeypatch):
    """A streamed model's in-sample answers (sessions it already includes, what the
    keeper re-records) go through the "settled" map; new arrivals keep the streamed map;
    a model fitted on every session keeps its own map whatever ``included`` says."""
    from services.clustering.domain.model import HouseholdModel, device_map_name
    values = _constant_maps(monkeypatch)
    X, dev = _two_people_with_phones_and_a_tv()
    m = HouseholdModel().fit(X[:40], device_ids=dev[:40])
    for a in range(40, X.shape[0], 5):
        m.update(X[a:a + 5], device_ids=dev[a:a + 5])
    assert m.streamed and m.n_persons == 2
    included = np.arange(X.shape[0]) < X.shape[0] - 5
    out = m.assign_batch(X, device_ids=dev, included=included)
    np.testing.assert_allclose(out.confidence[included], values["settled"])
    np.testing.assert_allclose(out.confidence[~included], values["streamed"])
    np.testing.assert_allclose(m.assign_batch(X, device_ids=dev).confidence, values["streamed"])
    assert device_map_name(young=True, streamed=True, settled=True) == "young"
    m.fit(X, device_ids=dev)
    np.testing.assert_allclose(m.assign_batch(X, device_ids=dev, included=True).confidence, values["fitted"])

