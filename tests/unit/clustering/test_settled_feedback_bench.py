"""bench.settled_feedback: the feedback calibrator, fitted on at-arrival answers, scored on
the settled answers GET /v1/household serves (docs/feedback.md)."""

from __future__ import annotations

from bench import _worlds_eval as E
from bench import settled_feedback as S
from bench.label_feedback import households


def test_it_scores_the_settled_answers_the_benchmark_scores_with_and_without_the_calibrator():
    hs = households("tuning", 4, 1, 1)[:1]
    out = S.carry_over(hs, draws=2, workers=1)
    assert out["households"] == len(hs) and out["sessions"] == sum(h.n_sessions for h in hs)
    streams = [E.hearth_stream(h, settled=True) for h in hs]
    settled, arrival = [s[3] for s in streams], [s[:3] for s in streams]
    # the same answers bench.accuracy's streaming_settled and streaming blocks score
    assert abs(out["accuracy"]["settled"] - E.summarise(hs, [s[0] for s in settled], None)["session_accuracy"]) < 1e-12
    assert abs(out["accuracy"]["arrival"] - E.summarise(hs, [a[0] for a in arrival], None)["session_accuracy"]) < 1e-12
    for key in ("arrival", "arrival_calibrated", "settled", "settled_calibrated"):
        assert 0.0 <= out["ece"][key]["mean"] <= 1.0
