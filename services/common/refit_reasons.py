"""The reason a Refit request carries when the feedback service sends it (its household
triggers: disagreement, drift), shared by the feedback service, which writes it, and the
clustering service, which reads it: a streamed household is not refitted for feedback
(docs/clustering.md, "in a stream"), whether the feedback comes as labels or as a
trigger's Refit."""

from __future__ import annotations

FEEDBACK_TRIGGER = "feedback trigger"


def feedback_trigger_reason(trigger_id: int, detail: str) -> str:
    """``detail``: what fired, e.g. ": disagreement 3 >= 3 over 5 feedback items"."""
    return f"{FEEDBACK_TRIGGER} {trigger_id}{detail}"


def is_feedback_trigger(reason: str) -> bool:
    return reason.startswith(FEEDBACK_TRIGGER + " ")
