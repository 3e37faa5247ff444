"""The calibrator type shared by the feedback service (which fits it) and the
clustering service (which applies it to every assignment).

A ``Calibrator`` is a versioned, JSON-serialisable recalibration map of "who is watching"
probability vectors; feedback's ``domain/recalibration.py`` explains the methods and
fits them, this module only validates, applies and (de)serialises them, so clustering
needs neither feedback's code nor scikit-learn.

Conventions: ``probs`` is an ``(n, K)`` matrix (a 1-D vector is one row), rows finite,
in [0, 1], summing to 1 within ``ROW_SUM_TOLERANCE``; a probability of exactly 0 stays 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.common.errors import InvalidArgument

CALIBRATOR_SCHEMA = 1
METHODS: tuple[str, ...] = ("identity", "temperature", "isotonic")
ROW_SUM_TOLERANCE = 1e-3  # the same slack the feedback service accepts at ingest; float32 sums are ~1e-7 * K off

FloatArray = NDArray[np.float64]


def as_probability_matrix(probs: ArrayLike, field: str = "probs") -> FloatArray:
    """Validate and return ``probs`` as a float64 ``(n, K)`` matrix (a 1-D vector is one row)."""
    try:
        matrix = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"must be numeric probabilities ({exc})", field) from None
    if matrix.ndim == 1:
        matrix = matrix[np.newaxis, :]
    if matrix.ndim != 2:
        raise InvalidArgument(f"must be a 2-D (n, K) matrix, got {matrix.ndim} dimensions", field)
    if matrix.shape[1] == 0 and matrix.shape[0] > 0:
        raise InvalidArgument("rows must have at least one probability", field)
    if matrix.size:
        if not np.all(np.isfinite(matrix)):
            raise InvalidArgument("contains NaN or infinite values", field)
        if matrix.min() < 0.0 or matrix.max() > 1.0:
            raise InvalidArgument("values must lie in [0, 1]", field)
        row_sums = matrix.sum(axis=1)
        # A one-person model's row may sum to less than one: the rest is a member the model
        # has not seen yet (clustering's confidence map, docs/clustering.md). With two or
        # more persons a row is a distribution over them.
        off = (row_sums - 1.0 > ROW_SUM_TOLERANCE) if matrix.shape[1] == 1 else (
            np.abs(row_sums - 1.0) > ROW_SUM_TOLERANCE)
        bad = np.flatnonzero(off)
        if bad.size:
            raise InvalidArgument(f"row {int(bad[0])} sums to {row_sums[bad[0]]:.6g}, not 1 (tolerance {ROW_SUM_TOLERANCE})", field)
    return matrix


def apply_temperature(probs: FloatArray, temperature: float) -> FloatArray:
    """softmax(log p / T) row-wise; zeros stay zero."""
    positive = probs > 0
    log_p = np.log(np.where(positive, probs, 1.0)) / temperature
    log_p = np.where(positive, log_p, -np.inf)
    log_p -= log_p.max(axis=1, keepdims=True)
    scaled = np.exp(log_p)
    return scaled / scaled.sum(axis=1, keepdims=True)


def apply_top_label_map(probs: FloatArray, x_points: FloatArray, y_points: FloatArray) -> FloatArray:
    """Replace top-label confidence c by interp(c) and rescale the rest (see module doc)."""
    n = probs.shape[0]
    if n == 0:
        return probs.copy()
    rows = np.arange(n)
    top = np.argmax(probs, axis=1)
    conf = probs[rows, top]
    rest = 1.0 - conf
    new_conf = np.clip(np.interp(conf, x_points, y_points), 0.0, 1.0)
    if probs.shape[1] > 1:
        runner_up = np.partition(probs, -2, axis=1)[:, -2]
        with np.errstate(invalid="ignore", divide="ignore"):
            floor = np.where(runner_up > 0, runner_up / (rest + runner_up), 0.0)
        # At the floor itself the runner-up would tie, and argmax would take the lower index;
        # a relative nudge keeps the predicted person strictly on top (floor <= 1/2, so <= 1).
        floor = floor * (1.0 + 1e-9)
        new_conf = np.maximum(new_conf, floor)
    # All mass already on one person: nobody else to give probability to (see module doc).
    movable = rest > 1e-12
    new_conf = np.where(movable, new_conf, conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(movable, (1.0 - new_conf) / np.where(movable, rest, 1.0), 1.0)
    out = probs * scale[:, np.newaxis]
    out[rows, top] = new_conf
    return out / out.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Calibrator:
    """A versioned recalibration map for one model (variant).

    ``method``: "identity" | "temperature" | "isotonic". ``parameters``:
    ``{}`` / ``{"temperature": T}`` / ``{"x": [...], "y": [...]}`` (isotonic breakpoints,
    x strictly increasing in [0, 1], y non-decreasing in [0, 1]). ``training``: free-form
    provenance (sample size, cross-validated scores) kept for operators.
    """

    version: int
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise InvalidArgument(f"must be an integer >= 0, got {self.version!r}", "version")
        if self.method not in METHODS:
            raise InvalidArgument(f"must be one of {METHODS}, got {self.method!r}", "method")
        if self.method == "temperature":
            t = self.parameters.get("temperature")
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t) or t <= 0:
                raise InvalidArgument(f"must be a finite number > 0, got {t!r}", "parameters.temperature")
        elif self.method == "isotonic":
            x = np.asarray(self.parameters.get("x", []), dtype=np.float64)
            y = np.asarray(self.parameters.get("y", []), dtype=np.float64)
            if x.ndim != 1 or x.size == 0 or x.shape != y.shape:
                raise InvalidArgument("x and y must be non-empty lists of equal length", "parameters.x")
            if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
                raise InvalidArgument("x and y must be finite", "parameters.x")
            if np.any(np.diff(x) <= 0) or x[0] < 0 or x[-1] > 1:
                raise InvalidArgument("must be strictly increasing within [0, 1]", "parameters.x")
            if np.any(np.diff(y) < -1e-12) or y.min() < 0 or y.max() > 1:
                raise InvalidArgument("must be non-decreasing within [0, 1]", "parameters.y")

    def apply(self, probs: ArrayLike) -> FloatArray:
        """Recalibrated probability vectors (same shape as given; a 1-D vector stays 1-D)."""
        one_vector = np.ndim(probs) == 1
        matrix = as_probability_matrix(probs)
        if matrix.shape[1] == 1:
            # One known person: nothing to redistribute between persons, and its confidence
            # already comes from the out-of-sample map; feedback cannot learn a better one
            # from labels that can only name that person.
            return matrix[0].copy() if one_vector else matrix.copy()
        if self.method == "temperature":
            out = apply_temperature(matrix, float(self.parameters["temperature"]))
        elif self.method == "isotonic":
            out = apply_top_label_map(
                matrix,
                np.asarray(self.parameters["x"], dtype=np.float64),
                np.asarray(self.parameters["y"], dtype=np.float64),
            )
        else:
            out = matrix.copy()
        return out[0] if one_vector else out

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": CALIBRATOR_SCHEMA,
            "version": self.version,
            "method": self.method,
            "parameters": self.parameters,
            "training": self.training,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibrator":
        if not isinstance(data, dict):
            raise InvalidArgument("must be a JSON object", "calibrator")
        if data.get("schema") != CALIBRATOR_SCHEMA:
            raise InvalidArgument(f"unsupported calibrator schema {data.get('schema')!r}", "schema")
        for key in ("version", "method"):
            if key not in data:
                raise InvalidArgument("is missing", key)
        parameters = data.get("parameters", {})
        training = data.get("training", {})
        if not isinstance(parameters, dict) or not isinstance(training, dict):
            raise InvalidArgument("parameters and training must be objects", "parameters")
        return cls(version=data["version"], method=data["method"], parameters=parameters, training=training)

    @classmethod
    def from_json(cls, text: str) -> "Calibrator":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"is not valid JSON ({exc.msg})", "calibrator") from None
        return cls.from_dict(data)


IDENTITY = Calibrator(version=0, method="identity")


IDENTITY = Calibrator(version=0, method="identity")
