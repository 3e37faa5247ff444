"""Which fitted calibrator versions of a variant stay stored (session 32, fence32).

Every refit stores a version (``calibrators``); until session 32 none was ever deleted, and
the schedule refits a variant every check (``HEARTH_FEEDBACK_CHECK_INTERVAL_S``, 300 s) with
500 new labels: up to 288 versions a day, for ever. What reads an old version is a
rollback (``hearth calibrator rollback`` goes to the newest version older than the one in
force; ``--to N`` to any stored one) and the listing it chooses from; clustering reads only
the one in force. So the versions kept are:

- the one in force (a rollback's held version included);
- the newest ``NEWEST_KEPT``: the rollback after a bad refit, and the newest keeps the
  numbering going (the next version is the largest stored + 1: a version number is never
  reused for another fit);
- the newest of each UTC day of the last ``DAYS_KEPT`` days (by ``fitted_at``): a rollback
  past a bad stretch of refits ("before the outage week"), which at the fastest schedule
  is thousands of versions back.
"""

from __future__ import annotations

from collections.abc import Iterable

NEWEST_KEPT = 20
DAYS_KEPT = 30
DAY_S = 86400.0


def versions_kept(versions: Iterable[tuple[int, float]], current: int, now: float) -> set[int]:
    """(version, fitted_at) of one variant's stored calibrators -> the versions to keep;
    ``current``: the version in force (0: none); ``now``: the time of the pass."""
    stored = sorted(versions, key=lambda v: v[0], reverse=True)
    kept = {version for version, _ in stored[:NEWEST_KEPT]}
    if current:
        kept.add(current)
    newest_of_day: dict[int, int] = {}
    for version, fitted_at in stored:
        if fitted_at >= now - DAYS_KEPT * DAY_S:
            day = int(fitted_at // DAY_S)
            newest_of_day[day] = max(version, newest_of_day.get(day, 0))
    return kept | set(newest_of_day.values())
