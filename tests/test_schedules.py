"""Schedules: records in Redis fired by coordinators, one run per tick however many fire.

The tick rules are pure functions of (schedule, last tick, now), tested with an injected
clock (daylight-saving changes, catchup, overlap). The firer is tested over real Redis with
an injected `now` (deterministic: no waiting for the wall clock), and the whole thing with
real coordinator and worker processes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from orchestrator._schedule_rules import Overlap, Plan, Timing, check_name, plan

BERLIN = ZoneInfo("Europe/Berlin")


def _local(tick: float) -> str:
    return datetime.fromtimestamp(tick, BERLIN).isoformat()


def _simulate(timing: Timing, start: datetime, end: datetime, step: int = 300) -> list[str]:
    """Passes every `step` seconds from `start` to `end`: the local times of every tick
    started, as each pass decides from the cursor the last one left."""
    cursor, fired = start.timestamp(), []
    for now in range(int(start.timestamp()), int(end.timestamp()), step):
        p = plan(timing, Overlap.ALLOW, 2 * step, cursor, None, False, now)
        fired += [_local(t) for t in p.start]
        cursor = p.last_tick
    return fired


# ---- the rules, with an injected clock --------------------------------------------------


def test_cron_follows_the_time_zones_daylight_saving_changes() -> None:
    daily = Timing("30 2 * * *", "Europe/Berlin")
    # Spring forward (30 March 2025, 02:00 -> 03:00): 02:30 does not exist; it runs at 03:00.
    assert _simulate(daily, datetime(2025, 3, 29, tzinfo=BERLIN),
                     datetime(2025, 4, 1, tzinfo=BERLIN)) == [
        "2025-03-29T02:30:00+01:00", "2025-03-30T03:00:00+02:00", "2025-03-31T02:30:00+02:00"]
    # Fall back (26 October 2025, 03:00 -> 02:00): 02:30 happens twice; it runs once.
    assert _simulate(daily, datetime(2025, 10, 25, tzinfo=BERLIN),
                     datetime(2025, 10, 28, tzinfo=BERLIN)) == [
        "2025-10-25T02:30:00+02:00", "2025-10-26T02:30:00+02:00", "2025-10-27T02:30:00+01:00"]
    # Finer than hourly runs by elapsed time: every half hour, through the repeated hour too.
    assert _simulate(Timing("*/30 * * * *", "Europe/Berlin"),
                     datetime(2025, 10, 26, 1, 45, tzinfo=BERLIN),
                     datetime(2025, 10, 26, 3, 15, tzinfo=BERLIN)) == [
        "2025-10-26T02:00:00+02:00", "2025-10-26T02:30:00+02:00", "2025-10-26T02:00:00+01:00",
        "2025-10-26T02:30:00+01:00", "2025-10-26T03:00:00+01:00"]
    # A cursor inside the repeated hour does not go back to the first 02:30.
    second_0245 = datetime(2025, 10, 26, 2, 45, tzinfo=BERLIN, fold=1).timestamp()
    assert _local(daily.next_after(second_0245) or 0) == "2025-10-27T02:30:00+01:00"
    # Intervals count seconds since the epoch, in no time zone.
    assert Timing(every=3600).upcoming(datetime(2025, 3, 30, 1, 30, tzinfo=BERLIN).timestamp(),
                                       2) == [1743296400.0, 1743300000.0]


def test_catchup_starts_recent_missed_ticks_once_and_notes_older_ones() -> None:
    every10 = Timing(every=10)
    p = plan(every10, Overlap.ALLOW, 35, 1000, None, False, now=1100.5)
    assert p.start == (1070, 1080, 1090, 1100) and p.last_tick == 1100
    assert p.notes == ({"event": "missed", "from": 1010, "until": 1065,
                        "reason": "older than the catchup window (35s)"},)
    assert plan(every10, Overlap.ALLOW, 35, p.last_tick, None, False, 1101) == Plan(1100, None)
    # A long outage is skipped in one step, not tick by tick.
    far = plan(Timing(every=1), Overlap.ALLOW, 2, 0, None, False, now=10**9)
    assert far.start == (10**9 - 2, 10**9 - 1, 10**9) and len(far.notes) == 1


@pytest.mark.parametrize(("overlap", "running", "buffered", "start", "stop", "keeps", "notes"), [
    (Overlap.ALLOW, True, None, (10, 20), False, None, []),
    (Overlap.SKIP, True, None, (), False, None, [("skipped", [10, 20])]),
    (Overlap.SKIP, False, None, (10,), False, None, [("skipped", [20])]),
    (Overlap.BUFFER_ONE, True, None, (), False, 10, [("buffered", 10), ("skipped", [20])]),
    (Overlap.BUFFER_ONE, True, 5, (), False, 5, [("skipped", [10, 20])]),
    (Overlap.BUFFER_ONE, False, 5, (5,), False, 10, [("buffered", 10), ("skipped", [20])]),
    (Overlap.CANCEL_OTHER, True, None, (20,), True, None, [("skipped", [10])]),
    (Overlap.CANCEL_OTHER, False, None, (20,), False, None, [("skipped", [10])]),
])
def test_overlap_decides_what_a_tick_does_while_the_previous_run_goes_on(
        overlap: Overlap, running: bool, buffered: float | None, start: tuple[float, ...],
        stop: bool, keeps: float | None, notes: list[tuple[str, Any]]) -> None:
    """Two ticks (10 and 20) due in one pass; a run started for one is running for the next."""
    p = plan(Timing(every=10), overlap, 60, 0, buffered, running, now=25)
    assert (p.start, p.stop_previous, p.buffered, p.last_tick) == (start, stop, keeps, 20)
    assert [(n["event"], n.get("tick", n.get("ticks"))) for n in p.notes] == notes


def test_bad_timings_and_names_are_refused() -> None:
    for kwargs, message in [
        ({"cron": "61 * * * *"}, "bad cron expression '61 * * * *': Bad minute"),
        ({"cron": "0 3 * * *", "timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"cron": "0 3 * * *", "timezone": "../../etc/passwd"}, "unknown time zone"),
        ({}, "either a cron expression or an interval"),
        ({"cron": "* * * * *", "every": 5}, "either a cron expression or an interval"),
        ({"every": 0}, "--every must be a whole number of seconds >= 1"),
        ({"every": 60, "timezone": "Europe/Berlin"}, "--timezone goes with --cron"),
    ]:
        with pytest.raises(ValueError, match=message.replace("*", r"\*")):
            Timing(**kwargs)
    for name in ("", "a b", "a:b", "{x}", "-x", "x" * 101):
        with pytest.raises(ValueError, match="schedule name"):
            check_name(name)
