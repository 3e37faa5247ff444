"""bench-feedback pads each household's probabilities into one wide matrix; the padding must
keep every row a distribution the shared calibration code accepts — including a one-person
model's row, which leaves mass for a member it has not seen (it crashed the benchmark)."""

from __future__ import annotations

import numpy as np

from bench.feedback import aligned
from services.common.calibration import as_probability_matrix


def test_a_one_person_rows_unseen_mass_gets_its_own_column():
    probs = np.array([[0.8467], [0.8467], [0.8467]])
    out, labels = aligned(probs, np.zeros(3, dtype=int), n_persons=1)
    assert np.allclose(out.sum(axis=1), 1.0)
    assert np.allclose(out[:, 0], 0.8467)          # the person keeps its confidence
    assert np.allclose(out[:, 2], 1.0 - 0.8467)    # the unseen member: a column no person names
    assert as_probability_matrix(out).shape == out.shape
    assert labels.tolist() == [0, 0, 0]


def test_columns_follow_the_true_persons_and_full_rows_get_no_extra_mass():
    # The model's column 1 is true person 0 and column 0 is true person 1.
    probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3]])
    out, _ = aligned(probs, np.array([0, 0, 1]), n_persons=2)
    assert np.allclose(out[:, 0], [0.9, 0.8, 0.3])
    assert np.allclose(out[:, 1], [0.1, 0.2, 0.7])
    assert np.allclose(out[:, 2:], 0.0)
