"""What the feedback service's calls to clustering carry, defined once for the side that
writes them (feedback) and the side that reads them (clustering):

* the ``reason`` of a ``Refit`` a household trigger sends (disagreement, drift): a streamed
  household is not refitted for feedback (docs/clustering.md, "in a stream"), whether the
  feedback comes as labels or as a trigger's Refit;
* the ``source`` of a label ``RecordLabels`` forwards: a label the user volunteered may name
  a person but not size one (HouseholdModel._labels_add_persons)."""

from __future__ import annotations

FEEDBACK_TRIGGER = "feedback trigger"


def feedback_trigger_reason(trigger_id: int, detail: str) -> str:
    """``detail``: what fired, e.g. ": disagreement 3 >= 3 over 5 feedback items"."""
    return f"{FEEDBACK_TRIGGER} {trigger_id}{detail}"


def is_feedback_trigger(reason: str) -> bool:
    return reason.startswith(FEEDBACK_TRIGGER + " ")


# A forwarded label's source ends with this when the user volunteered it
# (RecordFeedbackRequest.unprompted).
UNPROMPTED_LABEL_SUFFIX = ":unprompted"


def feedback_label_source(kind: str, unprompted: bool) -> str:
    """RecordLabels' ``source`` of a label forwarded from feedback of ``kind``."""
    return f"feedback:{kind}" + (UNPROMPTED_LABEL_SUFFIX if unprompted else "")
