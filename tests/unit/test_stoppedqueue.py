"""lab.onhost.stoppedqueue's verdict: what counts as traffic resuming after a stopped queue lost its reader."""

from __future__ import annotations

from lab.onhost.droptest import SeqCounter
from lab.onhost.net import CountersDelta, QdiscCounters, TapCounters
from lab.onhost.stoppedqueue import FAIL, PASS, Burst, judge


def change(ring_drops: int = 0, qdisc_drops: int = 0) -> CountersDelta:
    return CountersDelta("t0", 1.0, TapCounters(tx_dropped=ring_drops), QdiscCounters(kind="mq", drops=qdisc_drops))


def received(seqs) -> SeqCounter:
    c = SeqCounter()
    for s in seqs:
        c.add(s)
    return c


FIRST = Burst(0, tuple(range(600)))
SECOND = Burst(600, tuple(range(600, 1000)))


def test_a_stopped_queue_that_resumes_passes() -> None:
    r = judge(FIRST, change(), 536, SECOND, [190, 210], received(range(600, 1000)), change(), 0)
    assert r.verdict == PASS
    assert r.numbers["stopped"] is True and r.numbers["second_lost"] == 0
    assert "queue stopped (536 held" in r.detail


def test_stock_never_stops_and_passes_when_the_second_burst_arrives() -> None:
    r = judge(FIRST, change(ring_drops=536), 0, SECOND, [175, 225], received(range(600, 1000)), change(), 0)
    assert r.verdict == PASS and r.numbers["stopped"] is False
    assert "did not stop (536 ring drops" in r.detail


def test_a_queue_left_stopped_fails_and_says_which() -> None:
    half = [s for s in range(600, 1000) if s % 2 == 0]
    r = judge(FIRST, change(), 536, SECOND, [200, 0], received(half), change(), 200)
    assert r.verdict == FAIL
    assert "queue 1 delivered nothing" in r.detail
    assert "200 of its 400 datagrams never arrived" in r.detail
    assert "200 left in the qdisc" in r.detail
    assert r.numbers["backlog_end"] == 200 and r.numbers["second_lost"] == 200


def test_ring_drops_or_refused_sends_while_draining_fail() -> None:
    r = judge(FIRST, change(), 536, Burst(600, tuple(range(600, 990)), refused=10), [190, 200],
              received(range(600, 990)), change(ring_drops=3), 0)
    assert r.verdict == FAIL
    assert "10 sends of the second burst refused" in r.detail and "3 ring drops" in r.detail


def test_drops_by_reason_win_over_tx_dropped() -> None:
    # tx_dropped counts any drop of the device; only FULL_RING is the ring's
    ok = judge(FIRST, change(), 536, SECOND, [190, 210], received(range(600, 1000)), change(ring_drops=2), 0, {"QDISC_DROP": 2})
    assert ok.verdict == PASS and ok.numbers["second_ring_drops"] == 0
    bad = judge(FIRST, change(), 536, SECOND, [190, 210], received(range(600, 1000)), change(), 0, {"FULL_RING": 1})
    assert bad.verdict == FAIL and "1 ring drops while the reader drained" in bad.detail
