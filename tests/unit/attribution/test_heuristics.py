"""First-touch, last-touch and linear baselines (ChannelAttribution's definitions)."""

from __future__ import annotations

import numpy as np
import pytest

from services.attribution.domain.heuristics import first_touch, heuristic_attribution, last_touch, linear
from services.attribution.domain.paths import Paths


def test_hand_computed_baselines() -> None:
    p = Paths.from_lists([["a", "b", "a", "c"], ["b"], []], [2.0, 1.0, 5.0], [8.0, 3.0, 1.0], [0, 0, 0])
    np.testing.assert_allclose(first_touch(p).conversions, [2, 1, 0])
    np.testing.assert_allclose(last_touch(p).conversions, [0, 1, 2])
    # Linear counts touches: a occurs twice in a 4-touch path -> 2 * 2/4.
    np.testing.assert_allclose(linear(p).conversions, [1.0, 0.5 + 1.0, 0.5])
    np.testing.assert_allclose(linear(p).revenue, [4.0, 2.0 + 3.0, 2.0])
    allh = heuristic_attribution(p)
    for r in allh.values():
        assert r.conversions.sum() == 3.0  # the empty path credits nothing
        assert r.shares.sum() == pytest.approx(1.0)
