"""The answers a user reads back through the public API are the in-process service
path's, so the accuracy and calibration figures of docs/benchmarks.md (computed on
bench/_worlds_eval.ServiceStream -> ModelKeeper.advance) are the user's.

One generated household (a TUNING world of bench/worlds.py: its raw events) is posted
through POST /v1/events a day at a time, in time order, as a client would; after each
request the household is read back (GET /v1/household, cursor paging) once its model
status says settled, and at the end every session is read back. The same sessions in
the same arrivals (the sessions started by the end of each request) go through
ServiceStream in this process. Persons must be identical and probabilities equal to
1e-6: the service stores each probability rounded to 6 decimals (persons_for), which
moves it by at most 5e-7; the vectors travel as float32 both ways (the world's are
float32), so nothing else may differ.

Requests end at the first quiet half hour after midnight (bench.api_accuracy's
``cut="quiet"``): a session split between two requests is folded into the model with
its first part's vector (it is closed by the clock when its first part arrives), which
moves probabilities by up to a few hundredths (docs/operations.md)."""

from __future__ import annotations

import numpy as np
import pytest

from bench import worlds as W
from bench.api_accuracy import Api, inprocess, stream_household
from services.testing.mesh import running_mesh


@pytest.fixture(scope="module")
def api_mesh(tmp_path_factory):
    """A mesh of its own: the shared one's other tests change the A/B traffic split and
    may fit calibrators, which would move this household's answers away from the
    in-process path for reasons that are not the path."""
    with running_mesh(tmp_path_factory.mktemp("api-equivalence"), {"e2e-api": "admin"}, timeout_s=120) as m:
        yield m


def test_served_persons_and_probabilities_equal_the_in_process_service_path(api_mesh):
    # 156 sessions of 2 persons over 47 days (phones and a TV)
    h = W.generate(W.TUNING, families=("mobile_first",), worlds_per_family=1, households_per_world=2,
                   keep_events=True)[1]
    api = Api(api_mesh.url, api_mesh.api_key)
    try:
        run = stream_household(api, h, page=40, cut="quiet", settle_timeout_s=120.0)
    finally:
        api.close()
    assert run.requests >= 30 and run.pages >= 4 and run.variant == "gmm"
    # Every at-arrival answer was read once the household said settled (the wait is paced
    # by this run's slowest settle, bench.api_accuracy.ARRIVAL_PACE_FACTOR): an answer read
    # before that is not the path's answer and would fail below for another reason.
    assert run.unsettled_arrivals == 0, (run.unsettled_arrivals, max(run.settle_after_post_s))
    assert run.settled_flag, run.final_status
    assert run.sessions_served == h.n_sessions and set(run.settled) == set(h.session_ids)

    local = inprocess(h, run.ends)
    for when, served in (("settled", run.settled), ("at_arrival", run.at_arrival)):
        mine = dict(zip(h.session_ids, local[when]))
        persons = [served[s][0] for s in h.session_ids]
        assert persons == [mine[s][0] for s in h.session_ids], when
        gap = np.abs(np.array([served[s][1] for s in h.session_ids]) - [mine[s][1] for s in h.session_ids])
        assert gap.max() <= 1e-6, (when, float(gap.max()))
    assert len({p for p, _ in run.settled.values()}) >= 2   # a household the model splits
