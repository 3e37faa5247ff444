"""The calibrator type shared by the feedback service (which fits it) and the
clustering service (which applies it to every assignment).

A ``Calibrator`` is a versioned, JSON-serialisable recalibration map of "who is watching"
probability vectors; feedback's ``domain/recalibration.py`` explains the methods and
fits them, this module only validates, applies and (de)serialises them, so clustering
needs neither feedback's code nor scikit-learn.

Conventions: ``probs`` is an ``(n, K)`` matrix (a 1-D vector is one row), rows finite,
in [0, 1], summing to 1 within ``ROW_SUM_TOLERANCE``; a probability of exactly 0 stays 0.
A **one-person row** (exactly one positive entry, below 1: the answer of a model that
knows one person, the rest being a member it has not seen; zero-padded columns allowed)
may sum to less than one.

**Segments by model age.** A model that has seen few sessions is wrong more often than
a mature one at the same confidence (it may not have met every member yet), and the
mesh pools the answers of both. A calibrator may therefore carry, besides its pooled
map (``method``/``parameters``, fitted on every answer with feedback), per *model-age
segment* (``segment_edges``: the number of sessions the model had seen, e.g. ``[60]`` =
``sessions:0-59`` and ``sessions:60+``):

* ``segments[name]``: a calibrator applied *after* the pooled map to the multi-person
  rows of that segment (a residual correction; absent = the pooled map alone);
* ``one_person[name]``: a shift of the confidence of one-person rows of that segment
  (their only number; the pooled map cannot move it), ``one_person["all"]`` for rows
  whose model age is unknown.

Rows whose model age is unknown (0: predictions recorded before clustering sent it)
get the pooled map only.

**Groups.** A calibrator may also carry ``groups[name]``: a whole calibrator (itself
segmented by age) for the rows of one *calibration group*, fitted on that group's
feedback alone. Clustering stamps every answer with its group
(``services/clustering/domain/model.feedback_calibrator_rows``: "" by default,
``persons_from_labels`` for a model whose persons labels added) and applies the group's
calibrator; a row whose group has none (too little feedback, or a group the calibrator
does not know) gets the top-level one, fitted on every group's feedback pooled. A reader that predates segments ignores these keys and applies
the pooled map: the JSON keeps ``schema`` 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.common.errors import InvalidArgument
from services.common import strict_json

CALIBRATOR_SCHEMA = 1
METHODS: tuple[str, ...] = ("identity", "temperature", "isotonic")
ALL_AGES = "all"               # one_person key for rows whose model age is unknown
ONE_PERSON_MAX = 0.995         # a shifted one-person confidence stays below 1 (it is not a label)
ONE_PERSON_MIN = 0.01
MAX_GROUP_LENGTH = 128        # a calibration group's name (the prediction record's calibration_group, an id)
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
        # A one-person row may sum to less than one: the rest is a member the model has not
        # seen yet (clustering's confidence map, docs/clustering.md); zero-padded columns
        # do not make it a distribution. With two or more persons a row is a distribution.
        one_person = (matrix > 0).sum(axis=1) <= 1
        off = (row_sums - 1.0 > ROW_SUM_TOLERANCE) | (~one_person & (1.0 - row_sums > ROW_SUM_TOLERANCE))
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


def one_person_rows(matrix: FloatArray) -> NDArray[np.bool_]:
    """Rows that are a one-person answer: exactly one positive entry, below 1 (see module doc)."""
    return ((matrix > 0).sum(axis=1) == 1) & (matrix.max(axis=1, initial=0.0) < 1.0 - 1e-9)


def segment_names(edges: tuple[int, ...] | list[int]) -> list[str]:
    """Names of the model-age segments ``edges`` cut: ``[60]`` -> ``sessions:0-59``, ``sessions:60+``."""
    lows = [0, *edges]
    return [f"sessions:{lo}-{hi - 1}" for lo, hi in zip(lows, edges)] + [f"sessions:{lows[-1]}+"]


def segment_of(model_sessions: ArrayLike, edges: tuple[int, ...] | list[int]) -> NDArray[np.int64]:
    """(n,) segment index of each row by the sessions its model had seen; -1 = unknown (<= 0)."""
    ages = np.asarray(model_sessions, dtype=np.int64).reshape(-1)
    index = np.searchsorted(np.asarray(edges, dtype=np.int64), ages, side="right")
    return np.where(ages > 0, index, -1)


@dataclass(frozen=True)
class Calibrator:
    """A versioned recalibration map for one model (variant).

    ``method``: "identity" | "temperature" | "isotonic". ``parameters``:
    ``{}`` / ``{"temperature": T}`` / ``{"x": [...], "y": [...]}`` (isotonic breakpoints,
    x strictly increasing in [0, 1], y non-decreasing in [0, 1]). ``training``: free-form
    provenance (sample size, cross-validated scores) kept for operators.
    ``segment_edges`` / ``segments`` / ``one_person``: the per-model-age parts (module doc).
    """

    version: int
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    segment_edges: tuple[int, ...] = ()
    segments: dict[str, "Calibrator"] = field(default_factory=dict)
    one_person: dict[str, float] = field(default_factory=dict)
    groups: dict[str, "Calibrator"] = field(default_factory=dict)

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
        edges = self.segment_edges
        if any(isinstance(e, bool) or not isinstance(e, int) for e in edges) or any(
                b <= a for a, b in zip((0, *edges), edges)):
            raise InvalidArgument("must be strictly increasing positive integers", "segment_edges")
        names = set(segment_names(edges)) if edges else set()
        for name, part in self.segments.items():
            if name not in names or not isinstance(part, Calibrator) or part.segments or part.one_person:
                raise InvalidArgument(f"{name!r} is not a plain calibrator of a segment of {list(edges)}",
                                      "segments")
        for name, shift in self.one_person.items():
            if name not in names | {ALL_AGES}:
                raise InvalidArgument(f"{name!r} is not a segment of {list(edges)} nor {ALL_AGES!r}", "one_person")
            if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not -1.0 <= shift <= 1.0:
                raise InvalidArgument(f"must be a number in [-1, 1], got {shift!r}", f"one_person.{name}")
        for name, part in self.groups.items():
            if not isinstance(name, str) or len(name) > MAX_GROUP_LENGTH:
                raise InvalidArgument(f"group names are strings of at most {MAX_GROUP_LENGTH} characters", "groups")
            if not isinstance(part, Calibrator) or part.groups:
                raise InvalidArgument(f"{name!r} must be a calibrator without groups of its own", "groups")

    def apply(self, probs: ArrayLike, model_sessions: ArrayLike | None = None,
              groups: ArrayLike | str | None = None) -> FloatArray:
        """Recalibrated probability vectors (same shape as given; a 1-D vector stays 1-D).
        ``model_sessions`` (n,): sessions each row's model had seen (0 / None: unknown),
        which picks the row's segment; ``groups`` (n,) or one name for every row: each
        row's calibration group, which picks the group's calibrator when this one has it
        (None: the top-level one; module doc)."""
        one_vector = np.ndim(probs) == 1
        matrix = as_probability_matrix(probs)
        n = matrix.shape[0]
        ages = np.zeros(n, dtype=np.int64) if model_sessions is None else np.asarray(model_sessions).reshape(-1)
        if ages.shape[0] != n:
            raise InvalidArgument(f"must have one value per row ({n}), got {ages.shape[0]}", "model_sessions")
        if groups is not None and self.groups:
            names = np.full(n, groups, dtype=object) if isinstance(groups, str) else np.asarray(groups).reshape(-1)
            if names.shape[0] != n:
                raise InvalidArgument(f"must have one value per row ({n}), got {names.shape[0]}", "groups")
            own = np.isin(names, list(self.groups))
            out = np.empty_like(matrix)
            if (~own).any():
                out[~own] = self._apply_ungrouped(matrix[~own], ages[~own])
            for name, part in self.groups.items():
                rows = names == name
                if rows.any():
                    out[rows] = part._apply_ungrouped(matrix[rows], ages[rows])
            return out[0] if one_vector else out
        out = self._apply_ungrouped(matrix, ages)
        return out[0] if one_vector else out

    def _apply_ungrouped(self, matrix: FloatArray, ages: NDArray[np.int64]) -> FloatArray:
        """This calibrator's own maps (pooled, per age) on validated rows, groups aside."""
        n = matrix.shape[0]
        segment = segment_of(ages, self.segment_edges) if self.segment_edges else np.full(n, -1)
        names = segment_names(self.segment_edges) if self.segment_edges else []
        single = one_person_rows(matrix)
        out = matrix.copy()
        multi = ~single & ((matrix > 0).sum(axis=1) > 1)
        if multi.any():
            out[multi] = self._apply_pooled(matrix[multi])
            for i, name in enumerate(names):
                rows = multi & (segment == i)
                if name in self.segments and rows.any():
                    out[rows] = self.segments[name]._apply_pooled(out[rows])
        if single.any() and self.one_person:
            shift = np.array([self.one_person.get(names[s] if s >= 0 else ALL_AGES, 0.0) for s in segment[single]])
            rows = np.flatnonzero(single)
            top = out[rows].argmax(axis=1)
            out[rows, top] = np.clip(out[rows, top] + shift, ONE_PERSON_MIN, ONE_PERSON_MAX)
        return out

    def _apply_pooled(self, matrix: FloatArray) -> FloatArray:
        """The pooled map on rows that are distributions over two or more persons."""
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
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {
            "schema": CALIBRATOR_SCHEMA,
            "version": self.version,
            "method": self.method,
            "parameters": self.parameters,
            "training": self.training,
        }
        if self.segment_edges:
            out["segment_edges"] = list(self.segment_edges)
            out["segments"] = {name: {"method": c.method, "parameters": c.parameters, "training": c.training}
                               for name, c in self.segments.items()}
            out["one_person"] = dict(self.one_person)
        elif self.one_person:
            out["one_person"] = dict(self.one_person)
        if self.groups:
            out["groups"] = {name: c.to_dict() for name, c in self.groups.items()}
        return out

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
        edges = data.get("segment_edges", [])
        segments = data.get("segments", {})
        one_person = data.get("one_person", {})
        if not isinstance(edges, list) or not isinstance(segments, dict) or not isinstance(one_person, dict):
            raise InvalidArgument("segment_edges must be a list, segments and one_person objects", "segments")
        parts = {}
        for name, part in segments.items():
            if not isinstance(part, dict) or "method" not in part:
                raise InvalidArgument(f"{name!r} must be an object with a method", "segments")
            parts[name] = cls(version=data["version"], method=part["method"],
                              parameters=part.get("parameters", {}), training=part.get("training", {}))
        groups = data.get("groups", {})
        if not isinstance(groups, dict):
            raise InvalidArgument("must be an object", "groups")
        for name, part in groups.items():
            if not isinstance(part, dict) or "groups" in part:
                raise InvalidArgument(f"{name!r} must be a calibrator object without groups", "groups")
        return cls(version=data["version"], method=data["method"], parameters=parameters, training=training,
                   segment_edges=tuple(edges), segments=parts, one_person=one_person,
                   groups={name: cls.from_dict({**part, "version": data["version"]}) for name, part in groups.items()})

    @classmethod
    def from_json(cls, text: str) -> "Calibrator":
        try:
            data = strict_json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"is not valid JSON ({exc.msg})", "calibrator") from None
        return cls.from_dict(data)


IDENTITY = Calibrator(version=0, method="identity")
