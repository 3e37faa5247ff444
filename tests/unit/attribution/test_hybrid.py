"""Hybrid mixing and Dirichlet persona priors."""

from __future__ import annotations

import numpy as np
import pytest

from services.attribution.domain.errors import AttributionInputError
from services.attribution.domain.hybrid import hybrid_credit, smoothed_markov_attribution
from services.attribution.domain.markov import MarkovConventions, markov_attribution
from services.attribution.domain.paths import Paths


def test_hybrid_endpoints_and_range() -> None:
    m, s = np.array([3.0, 1.0]), np.array([2.0, 2.0])
    np.testing.assert_array_equal(hybrid_credit(m, s, 1.0), m)
    np.testing.assert_array_equal(hybrid_credit(m, s, 0.0), s)
    np.testing.assert_allclose(hybrid_credit(m, s, 0.25), [2.25, 1.75])
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(AttributionInputError) as exc:
            hybrid_credit(m, s, bad)
        assert exc.value.field == "alpha"


def _persona_and_person():
    persona = Paths.from_lists(
        [["a", "b"], ["b", "c"], ["a", "c"], ["c"], ["a"]], [3, 2, 1, 1, 0], [30, 20, 10, 10, 0], [5, 4, 6, 3, 8]
    )
    person = Paths.from_lists([["a", "b"], ["c"]], [1, 0], [10, 0], [0, 1], channel_names=["a", "b", "c"])
    return persona, person


def test_zero_strength_is_the_raw_person_chain() -> None:
    persona, person = _persona_and_person()
    raw = markov_attribution(person)
    smoothed = smoothed_markov_attribution(person, persona, 0.0)
    np.testing.assert_allclose(smoothed.conversions, raw.conversions, atol=1e-12)


def test_huge_strength_tends_to_persona_shares() -> None:
    persona, person = _persona_and_person()
    pooled = markov_attribution(persona)
    smoothed = smoothed_markov_attribution(person, persona, 1e9)
    np.testing.assert_allclose(smoothed.shares, pooled.shares, atol=1e-6)
    assert smoothed.conversions.sum() == pytest.approx(person.conversions.sum())


def test_prior_gives_credit_to_channels_the_person_has_sparse_data_on() -> None:
    persona, person = _persona_and_person()
    raw = markov_attribution(person)
    smoothed = smoothed_markov_attribution(person, persona, 5.0)
    # The person's only "c" journey did not convert, so raw credit for c is 0; the
    # persona says c converts, and the posterior mean moves towards that.
    assert raw.conversions[2] == pytest.approx(0.0)
    assert smoothed.conversions[2] > 0.0


def test_smoothing_rejects_bad_strength_and_horizon() -> None:
    persona, person = _persona_and_person()
    with pytest.raises(AttributionInputError) as exc:
        smoothed_markov_attribution(person, persona, -1.0)
    assert exc.value.field == "strength"
    with pytest.raises(AttributionInputError):
        smoothed_markov_attribution(person, persona, 1.0, MarkovConventions(horizon=3))
