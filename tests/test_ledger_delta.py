"""The LiteLLM sink's delta arithmetic: cumulative usage events -> what to add, skip or dead-letter."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from sidecar.ledger.delta import INT4_MAX, Applied, DeadLetter, Delta, Skip, delta, totals
from sidecar.usage import UsageEvent

STARTED = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def event(seq: int, cost: str = "0", *, tokens: tuple[int, int] = (0, 0), seconds: str = "0") -> UsageEvent:
    """A usage event of session `s1` with cumulative figures."""
    return UsageEvent(
        event_id=f"e{seq}", type="checkpoint", session_id="s1", seq=seq, key_hash="h", key_alias="a",
        user_id="u", team_id="t", model="gpt-realtime", provider_model="openai/gpt-realtime", kind="audio",
        unit="second", quantity=Decimal(seconds), audio_seconds=Decimal(seconds), audio_bytes=0,
        input_tokens=tokens[0], output_tokens=tokens[1], cost_usd=Decimal(cost), started_at=STARTED,
    )  # fmt: skip


def test_the_first_event_applies_its_whole_figures_as_the_first_request() -> None:
    """With nothing applied, the delta is the event's cumulative figures and it counts as the request."""
    d = delta(None, event(1, "0.25", tokens=(10, 20), seconds="3.5"))
    assert d == Delta(
        Decimal("0.25"),
        10,
        20,
        Decimal("3.5"),
        first=True,
        totals=totals(event(1, "0.25", tokens=(10, 20), seconds="3.5")),
    )
    assert isinstance(d, Delta) and d.total_tokens == 30


def test_a_later_event_applies_only_the_difference_and_is_not_a_new_request() -> None:
    """After seq 1, seq 3 adds its figures minus seq 1's; the session was already counted."""
    last = totals(event(1, "0.25", tokens=(10, 20), seconds="3.5"))
    d = delta(last, event(3, "0.40", tokens=(15, 20), seconds="5"))
    assert isinstance(d, Delta)
    assert (d.cost_usd, d.input_tokens, d.output_tokens, d.audio_seconds, d.first) == (
        Decimal("0.15"),
        5,
        0,
        Decimal("1.5"),
        False,
    )


def test_an_event_not_newer_is_skipped() -> None:
    """The same seq or an older one is a Skip, whatever its figures."""
    last = totals(event(4, "1"))
    assert isinstance(delta(last, event(4, "1")), Skip)
    assert isinstance(delta(last, event(2, "0.5")), Skip)


def test_figures_going_backwards_are_dead_lettered() -> None:
    """A newer seq with less cost, tokens or seconds than applied is never applied."""
    last = totals(event(1, "1", tokens=(10, 10), seconds="2"))
    for bad in (event(2, "0.9", tokens=(10, 10), seconds="2"), event(2, "1", tokens=(9, 10), seconds="2"),
                event(2, "1", tokens=(10, 10), seconds="1")):  # fmt: skip
        outcome = delta(last, bad)
        assert isinstance(outcome, DeadLetter), bad
    assert "cost_usd" in delta(last, event(2, "0.5")).reason  # type: ignore[union-attr]


def test_unstorable_values_are_dead_lettered() -> None:
    """Non-finite or huge amounts, negative tokens, and token deltas beyond int4 are dead letters."""
    for bad in (
        event(1).with_changes(cost_usd=Decimal("NaN")),
        event(1).with_changes(audio_seconds=Decimal("Infinity")),
        event(1).with_changes(cost_usd=Decimal("1e400")),
        event(1, tokens=(-1, 0)),
        event(1, tokens=(INT4_MAX, 1)),
    ):
        assert isinstance(delta(None, bad), DeadLetter), bad


@st.composite
def sessions(draw: st.DrawFn) -> list[UsageEvent]:
    """A session's events with non-decreasing cumulative figures, seq 1..n."""
    n = draw(st.integers(1, 8))
    steps = draw(
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 500), st.integers(0, 500)), min_size=n, max_size=n)
    )
    out, cost, inp, outp = [], 0, 0, 0
    for seq, (c, i, o) in enumerate(steps, start=1):
        cost, inp, outp = cost + c, inp + i, outp + o
        out.append(event(seq, str(Decimal(cost).scaleb(-6)), tokens=(inp, outp), seconds=str(Decimal(inp).scaleb(-1))))
    return out


@given(sessions(), st.data())
def test_any_order_and_duplication_applies_the_highest_seq_totals_once(
    events: list[UsageEvent], data: st.DataObject
) -> None:
    """Delivered in any order, with repeats, the applied deltas sum to the highest seq's totals, one request."""
    delivery = data.draw(
        st.lists(st.sampled_from(events), min_size=1, max_size=30).map(lambda extra: [*extra, *events])
    )
    delivery = data.draw(st.permutations(delivery))
    last: Applied | None = None
    applied: list[Delta] = []
    for e in delivery:
        outcome = delta(last, e)
        assert not isinstance(outcome, DeadLetter)
        if isinstance(outcome, Delta):
            applied.append(outcome)
            last = outcome.totals
    final = events[-1]
    assert sum((d.cost_usd for d in applied), Decimal(0)) == final.cost_usd
    assert sum(d.input_tokens for d in applied) == final.input_tokens
    assert sum(d.output_tokens for d in applied) == final.output_tokens
    assert sum((d.audio_seconds for d in applied), Decimal(0)) == final.audio_seconds
    assert [d.first for d in applied].count(True) == 1 and applied[0].first
