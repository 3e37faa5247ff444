"""Which calibrator is in force for a variant: roll back (or forward) to a stored
version, and hold automatic refits while an operator decides.

Fitted calibrators stay stored (``calibrators``, one row per variant and version) as long
as a rollback may need them (domain/calibrator_versions.py: since session 32 each fit
deletes the others);
``calibrator_current`` points at the one clustering applies. A refit that makes things
worse (a skewed week of feedback, a bug in a feedback source) is undone by pointing back
at an earlier version — or at none (version 0: identity, the raw model confidences).

A rollback would be undone by the next scheduled refit, which fits on all feedback so
far; so a choice can *hold* the variant: automatic refits (the schedule and the cohort
triggers) skip it until a choice releases it. Each choice is a versioned row of the
feedback service's flags history under ``calibrator:<variant>`` (compare-and-swap on the
version, like the experiment flags) with its reason and principal, and is audited
through the same hook as a flag change (event ``flag_change``, resource
``experiment/calibrator:<variant>``), so who rolled back what, when and why is in the
audit log.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from services.common.errors import Conflict, InvalidArgument, NotFound
from services.common.identity import Principal
from services.common.text import check_text
from services.feedback.peers import FlagChange
from services.feedback.store import FeedbackStore

CHOICE_PREFIX = "calibrator:"
MAX_VARIANT_CHARS = 64
CAS_ATTEMPTS = 5


@dataclass(frozen=True)
class CalibratorVersionView:
    version: int
    method: str
    fitted_at: float
    n: int


@dataclass(frozen=True)
class CalibratorHistory:
    variant: str
    current_version: int          # 0: none in force (identity)
    held: bool
    versions: list[CalibratorVersionView]   # newest first
    choice_version: int           # 0: no choice made yet
    reason: str


@dataclass(frozen=True)
class CalibratorChoice:
    variant: str
    version: int
    previous_version: int
    choice_version: int


def choice_key(variant: str) -> str:
    return CHOICE_PREFIX + variant


class CalibratorChoices:
    """List and change which calibrator is in force (see the module docstring)."""

    def __init__(self, store: FeedbackStore, known_variants: tuple[str, ...],
                 audit: Callable[[FlagChange], str], clock: Callable[[], float],
                 max_reason_chars: int = 500) -> None:
        self.store = store
        self.known_variants = known_variants
        self.audit = audit
        self.clock = clock
        self.max_reason_chars = max_reason_chars

    def _check_variant(self, variant: str) -> str:
        if not isinstance(variant, str) or not 0 < len(variant) <= MAX_VARIANT_CHARS:
            raise InvalidArgument(f"must be a variant name of 1-{MAX_VARIANT_CHARS} characters", "variant")
        return check_text(variant, "variant", max_chars=MAX_VARIANT_CHARS)

    def held(self, variant: str) -> bool:
        return self.store.held(choice_key(variant))

    def held_variants(self, variants) -> set[str]:
        return {v for v in variants if self.held(v)}

    def history(self, variant: str) -> CalibratorHistory:
        variant = self._check_variant(variant)
        stored = self.store.calibrator_versions(variant)
        if not stored and variant not in self.known_variants:
            raise NotFound(f"no calibrator for variant {variant!r}; known variants: {list(self.known_variants)}",
                           "variant")
        current = self.store.current_calibrators().get(variant)
        choice = self.store.current_flags(choice_key(variant))
        versions = []
        for entry in stored:
            body = json.loads(entry.calibrator_json)
            versions.append(CalibratorVersionView(entry.version, str(body.get("method", "")), entry.fitted_at,
                                                  int((body.get("training") or {}).get("n", 0))))
        return CalibratorHistory(variant, current.version if current else 0,
                                 bool(choice and json.loads(choice.flags_json).get("hold")), versions,
                                 choice.version if choice else 0, choice.reason if choice else "")

    def activate(self, variant: str, version: int, hold: bool, reason: str, principal: Principal) -> CalibratorChoice:
        """Put ``version`` (0: identity) in force for ``variant``; ``hold`` keeps it
        there (automatic refits skip the variant) until a later choice releases it."""
        variant = self._check_variant(variant)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidArgument("must be a stored version (>= 1) or 0 for none (identity)", "version")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > self.max_reason_chars:
            raise InvalidArgument(f"must say why, in 1-{self.max_reason_chars} characters", "reason")
        check_text(reason, "reason", max_chars=self.max_reason_chars, multiline=True)
        if version == 0 and variant not in self.known_variants and not self.store.calibrator_versions(variant):
            raise NotFound(f"no calibrator for variant {variant!r}; known variants: {list(self.known_variants)}",
                           "variant")
        key = choice_key(variant)
        for _ in range(CAS_ATTEMPTS):
            previous_choice = self.store.current_flags(key)
            current = self.store.current_calibrators().get(variant)
            previous_version = current.version if current else 0
            choice_version = (previous_choice.version if previous_choice else 0) + 1
            body = json.dumps({"version": version, "hold": bool(hold), "previous_version": previous_version},
                              sort_keys=True)
            now = self.clock()
            if self.store.activate_calibrator(variant, version, key, choice_version, body, reason,
                                              principal.id, now):
                break
        else:
            raise Conflict("the calibrator choice changed concurrently; retry", "version")
        change = FlagChange(key, choice_version, choice_version - 1, body,
                            previous_choice.flags_json if previous_choice else "{}", reason, principal, now)
        self.store.set_flags_audit_result(key, choice_version, self.audit(change))
        return CalibratorChoice(variant, version, previous_version, choice_version)
