"""The person level of AttributionApp.attribute when no touch or conversion resolves to a
person: no person is credited (until session 17 every journey went to a made-up "p1",
the id clustering gives a real person of the household)."""

from __future__ import annotations

from services.attribution.app import AttributeQuery, AttributionApp
from services.attribution.domain.records import Conversion, Touchpoint

DAY = 86400.0
T0 = 1_790_000_000.0


class Store:
    def __init__(self, touches, conversions) -> None:
        self.touches, self.conversions = touches, conversions

    def load(self, account_ids, start, end, lookback_s):
        return self.touches, self.conversions


class Resolver:
    def __init__(self, answer: dict[str, float]) -> None:
        self.answer = answer

    def resolve(self, instants):
        return [dict(self.answer) for _ in instants]


def _app(answer: dict[str, float]) -> AttributionApp:
    touches = [Touchpoint(f"tp{i}", "acc-1", "tv", T0 + i * DAY, "email" if i % 2 else "search") for i in range(6)]
    conversions = [Conversion(f"cv{i}", "acc-1", T0 + i * DAY + 3600, "purchase", 5.0, "tv") for i in (1, 4)]
    return AttributionApp(Store(touches, conversions), Resolver(answer))


def _scopes(app: AttributionApp, **query) -> list[tuple[str, str]]:
    outcome = app.attribute(AttributeQuery(account_ids=("acc-1",), **query))
    return [(r.scope, r.person_id) for r in outcome.results]


def test_nothing_resolved_credits_no_person():
    assert _scopes(_app({})) == [("household", "")]
    assert _scopes(_app({}), levels=("person",)) == []


def test_nothing_resolved_with_a_persona_prior_credits_no_person():
    assert _scopes(_app({}), persona_prior_strength=5.0, personas=(("acc-1", "p1", "evening"),)) == [("household", "")]


def test_resolved_touches_credit_the_persons_they_name():
    assert _scopes(_app({"p2": 0.8, "p3": 0.2})) == [("household", ""), ("person", "p2")]
