"""Experiments room of the feedback service: the model-variant experiment's flags
(SetFlag: a new version by compare-and-swap, then audited through the FlagAuditor) and
its view (GetExperiment: an account's variant, the split, per-variant results, the
treatment-vs-control p-value)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from services.common.errors import Conflict, InvalidArgument
from services.common.identity import Principal
from services.common.ids import check_id
from services.common.text import check_text
from services.feedback import instruments
from services.feedback.calibration import Calibration
from services.feedback.domain.variants import ExperimentFlags, assign_variant, assign_variants, compare_variants
from services.feedback.peers import FlagAuditor, FlagChange, audit_flag_change
from services.feedback.policy import FeedbackPolicy
from services.feedback.store import FeedbackStore

log = logging.getLogger("hearth.feedback")

MAX_REASON_CHARS = 500
MAX_VARIANTS_PER_CALL = 10_000   # GetVariants' account ids (RecordPrediction's bound)
EXPERIMENT_BOOTSTRAP_DRAWS = 200  # GetExperiment reports only the z-test; keep the bootstrap cheap
FLAG_CAS_ATTEMPTS = 5


@dataclass(frozen=True)
class VariantResultView:
    variant: str
    n: int
    accuracy: float
    brier: float


@dataclass(frozen=True)
class ExperimentView:
    variant: str
    traffic: dict[str, float]
    kill_switch: bool
    results: list[VariantResultView]
    p_value: float
    version: int


class Experiments:
    def __init__(self, store: FeedbackStore, policy: FeedbackPolicy, calibration: Calibration, *,
                 auditor: FlagAuditor | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.policy = policy
        self.calibration = calibration
        self.auditor = auditor
        self.clock = clock

    def default_flags(self) -> ExperimentFlags:
        """Before the first SetFlag: everyone in control (version 0)."""
        return ExperimentFlags(salt=self.policy.experiment, control=self.policy.control, traffic={},
                               kill_switch=False, version=0)

    def flags(self) -> ExperimentFlags:
        stored = self.store.current_flags(self.policy.experiment)
        return ExperimentFlags.from_json(stored.flags_json) if stored else self.default_flags()

    def experiment(self, account_id: str = "") -> ExperimentView:
        """The account's variant (when given), the configured split (control included;
        ``kill_switch`` says whether it is in force), per-variant results on feedback, and
        the p-value of the accuracy z-test of treatment vs control (with several
        treatments: the smallest, Bonferroni-adjusted; NaN when nothing to compare)."""
        flags = self.flags()
        variant = assign_variant(flags, check_id(account_id, "account_id")) if account_id else ""
        treated = sum(flags.traffic.values())
        traffic = {flags.control: round(100.0 - treated, 2), **{k: float(v) for k, v in flags.traffic.items()}}
        results: list[VariantResultView] = []
        p_value = math.nan
        data = self.calibration.dataset()
        if len(data):
            metrics, comparisons = compare_variants(data.variants, data.confidence, data.correct, data.weights,
                                                    control=flags.control, n_bootstrap=EXPERIMENT_BOOTSTRAP_DRAWS)
            results = [VariantResultView(m.variant, m.n, m.accuracy, m.brier) for m in metrics.values()]
            for m in metrics.values():
                instruments.VARIANT_ACCURACY.labels(m.variant).set(m.accuracy)
            if comparisons:
                p_value = min(1.0, min(c.p_value for c in comparisons) * len(comparisons))
        return ExperimentView(variant, traffic, flags.kill_switch, results, p_value, flags.version)

    def variants(self, account_ids: list[str]) -> list[str]:
        """Each account's variant (``experiment(a).variant``), in order, under one read of
        the flags and without the per-variant results (their dataset read and bootstrap
        are ``experiment``'s cost): GetVariants, what a model refresh of many households
        asks (one GetExperiment a household before session 32)."""
        if len(account_ids) > MAX_VARIANTS_PER_CALL:
            raise InvalidArgument(f"at most {MAX_VARIANTS_PER_CALL} a call", "account_ids")
        for i, account in enumerate(account_ids):
            check_id(account, f"account_ids[{i}]")
        return [str(v) for v in assign_variants(self.flags(), account_ids)] if account_ids else []

    def set_flags(self, traffic: Mapping[str, float], kill_switch: bool, reason: str,
                  principal: Principal) -> int:
        """New flags version: ``traffic`` is the full split (control included, summing to
        100, known variants only); an empty ``traffic`` keeps the current split and sets
        only the kill switch. Stored (compare-and-swap on the version), then audited."""
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
            raise InvalidArgument(f"must say why, in 1-{MAX_REASON_CHARS} characters", "reason")
        check_text(reason, "reason", max_chars=MAX_REASON_CHARS, multiline=True)
        for name in traffic:
            if name not in self.policy.variants:
                raise InvalidArgument(f"unknown variant {name!r}; known: {list(self.policy.variants)}",
                                      f"traffic.{name}")
        for _ in range(FLAG_CAS_ATTEMPTS):
            stored = self.store.current_flags(self.policy.experiment)
            current = ExperimentFlags.from_json(stored.flags_json) if stored else self.default_flags()
            version = current.version + 1
            if traffic:
                new = ExperimentFlags.from_split(self.policy.experiment, dict(traffic), self.policy.control,
                                                 kill_switch=kill_switch, version=version)
            else:
                new = replace(current, kill_switch=kill_switch, version=version)
            now = self.clock()
            if self.store.insert_flags(self.policy.experiment, version, new.to_json(), reason, principal.id, now):
                break
        else:
            raise Conflict("flags changed concurrently; retry", "version")
        change = FlagChange(self.policy.experiment, version, current.version, new.to_json(), current.to_json(),
                            reason, principal, now)
        result = self.audit_flag_change(change)
        self.store.set_flags_audit_result(self.policy.experiment, version, result)
        return version

    def audit_flag_change(self, change: FlagChange) -> str:
        """The audit hook of every flag change (peers.audit_flag_change)."""
        return audit_flag_change(self.auditor, change)
