"""review20: ``servicer.assignments_response`` (session 20's hand-written wire encoder)
against ``assignment_to_pb`` on what the answer-level tests do not draw: person and
prediction ids of any Unicode text (multi-byte UTF-8, empty, longer than 127 bytes so
lengths take two varint bytes), NaN / infinite / negative-zero probabilities, any batch
id, every cold-start value, extreme model versions, households' rows interleaved in the
message. The two must serialize to the same bytes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.clustering.v1 import clustering_pb2 as pb
from services.clustering.app import Answers
from services.clustering.servicer import _COLD, assignment_to_pb, assignments_response

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)   # lone surrogates are not UTF-8
PROBABILITY = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def _answers(draw) -> Answers:
    persons = draw(st.lists(TEXT, min_size=1, max_size=4, unique=True))
    n = draw(st.integers(1, 4))
    rows = [{p: draw(PROBABILITY) for p in persons} for _ in range(n)]
    return Answers([draw(st.sampled_from(persons)) for _ in range(n)], rows, [draw(TEXT) for _ in range(n)],
                   draw(TEXT), draw(st.integers(-2**63, 2**63 - 1)), draw(st.sampled_from(sorted(_COLD))),
                   draw(st.integers(-2**31, 2**31 - 1)))


@given(st.lists(_answers(), max_size=4), TEXT, st.randoms(use_true_random=False))
@settings(max_examples=150, deadline=None)
def test_the_wire_encoder_writes_what_assignment_to_pb_does_for_any_text_and_float(households, batch_id, rnd):
    total = sum(len(a.person_ids) for a in households)
    order = list(range(total))
    rnd.shuffle(order)
    parts, expected, start = [], [None] * total, 0
    for answers in households:
        n = len(answers.person_ids)
        rows = np.array(order[start:start + n], dtype=np.int64)
        start += n
        parts.append((rows, answers))
        for i, out in zip(rows.tolist(), answers.outs()):
            expected[i] = assignment_to_pb(out)
    got = assignments_response(batch_id, total, parts)
    want = pb.AssignSessionsResponse(batch_id=batch_id, assignments=expected)
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)
