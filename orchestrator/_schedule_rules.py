"""When a schedule fires and what a tick does: pure functions of (schedule, cursor, now).

No I/O and no clock: the caller passes `now` (Redis's clock on a cluster, any number in a
test), so a daylight-saving change or a week of downtime is a unit test.

A tick is a whole second (epoch seconds): a cron match (cronsim, evaluated in the
schedule's time zone, with Debian cron's rules across daylight-saving changes) or a
multiple of `every` seconds since the Unix epoch. Its run id is `sched-<name>-<tick>`, so
every coordinator that fires the same tick asks for the same run, and the store creates
it once. The cursor (`last_tick`) says every tick up to it has been decided: started,
skipped, buffered or missed.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# Due ticks decided in one pass; the rest wait for the next pass (a long catchup window
# after a long outage must not hold a coordinator for minutes).
MAX_TICKS_PER_PASS = 100


class Overlap(enum.StrEnum):
    """What a tick does while the schedule's previous run is still going."""

    SKIP = "skip"  # the tick is skipped and noted
    ALLOW = "allow"  # start anyway
    BUFFER_ONE = "buffer_one"  # remember one tick; start it when the previous run ends
    CANCEL_OTHER = "cancel_other"  # stop the previous run, then start


def check_name(name: str) -> str:
    """Schedule names go into run ids and Redis keys."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"schedule name {name!r} must be 1-100 letters, digits, '_', '.' "
                         f"or '-', starting with a letter or digit")
    return name


def run_id_for(name: str, tick: float) -> str:
    return f"sched-{name}-{int(tick)}"


def manual_run_id(name: str, now: float) -> str:
    """A run started by hand (`trigger`): never the id of a tick."""
    return f"sched-{name}-manual-{int(now * 1000)}"


@dataclass(frozen=True)
class Timing:
    """A cron expression in a time zone, or a fixed interval in whole seconds."""

    cron: str | None = None
    timezone: str = "UTC"
    every: int | None = None

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every is None):
            raise ValueError("a schedule needs either a cron expression or an interval "
                             "(--cron or --every), not both")
        if self.every is not None:
            if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
                raise ValueError(f"--every must be a whole number of seconds >= 1, "
                                 f"got {self.every!r}")
            if self.timezone != "UTC":
                raise ValueError("--timezone goes with --cron (an interval has no time zone)")
            return
        zone = self.zone()
        try:
            CronSim(str(self.cron), datetime(2000, 1, 1, tzinfo=zone))
        except CronSimError as exc:
            raise ValueError(f"bad cron expression {self.cron!r}: {exc}") from None

    def zone(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ValueError(f"unknown time zone {self.timezone!r} (an IANA name such as "
                             f"'Europe/Berlin' or 'UTC')") from None

    def next_after(self, t: float) -> float | None:
        """The first tick strictly after `t`; None if a cron expression never matches again."""
        if self.every is not None:
            return float((math.floor(t) // self.every + 1) * self.every)
        # cronsim walks wall-clock time when an expression names its hours and minutes (as
        # Debian cron does: a 02:30 job runs once when the clocks go back), so the wall time
        # of a moment in the repeated hour can map to an earlier instant: skip those.
        for match in CronSim(str(self.cron), datetime.fromtimestamp(t, self.zone())):
            if match.timestamp() > t:
                return match.timestamp()
        return None

    def upcoming(self, after: float, count: int) -> list[float]:
        ticks: list[float] = []
        tick = self.next_after(after)
        while tick is not None and len(ticks) < count:
            ticks.append(tick)
            tick = self.next_after(tick)
        return ticks


@dataclass(frozen=True)
class Plan:
    """What one pass decides for one schedule."""

    last_tick: float  # the new cursor: every tick up to it is decided
    buffered: float | None  # the tick waiting for the previous run to end (buffer_one)
    start: tuple[float, ...] = ()  # ticks to start, in order
    stop_previous: bool = False  # cancel_other: stop the previous run before starting
    notes: tuple[dict[str, Any], ...] = ()

    def changes(self, last_tick: float, buffered: float | None) -> bool:
        return (self.last_tick, self.buffered) != (last_tick, buffered) or bool(self.start)


def is_due(timing: Timing, last_tick: float, buffered: float | None, now: float) -> bool:
    """Whether a pass has anything to decide (cheap: no need to look at the previous run)."""
    tick = timing.next_after(last_tick)
    return buffered is not None or (tick is not None and tick <= now)


def plan(timing: Timing, overlap: Overlap, catchup: float, last_tick: float,
         buffered: float | None, previous_running: bool, now: float,
         limit: int = MAX_TICKS_PER_PASS) -> Plan:
    """Decide the ticks due by `now` after the cursor `last_tick`.

    Ticks older than `now - catchup` are missed: skipped as one note, never enumerated (an
    `--every 1` schedule back from a day's outage). Overlap applies to the ticks of one
    pass too: a run started by the first of them is running when the next is decided.
    cancel_other keeps only the latest due tick, rather than starting runs only to stop them.
    """
    notes: list[dict[str, Any]] = []
    cursor = last_tick
    # Ticks are whole seconds: the first one inside the window is the first after this.
    window = math.ceil(now - catchup) - 1
    first = timing.next_after(cursor)
    if first is not None and first <= window:
        notes.append({"event": "missed", "from": first, "until": float(window),
                      "reason": f"older than the catchup window ({catchup:g}s)"})
        cursor = float(window)
    due: list[float] = []
    tick = timing.next_after(cursor)
    while tick is not None and tick <= now and len(due) < limit:
        due.append(tick)
        tick = timing.next_after(tick)
    cursor = due[-1] if due else cursor

    start: list[float] = []
    skipped: list[float] = []
    running = previous_running
    stop_previous = False
    if buffered is not None and not running:
        start.append(buffered)
        buffered, running = None, True
    if overlap is Overlap.ALLOW:
        start += due
    elif overlap is Overlap.CANCEL_OTHER:
        if due:
            *superseded, latest = due
            notes += _skipped(superseded, "superseded by a later due tick")
            stop_previous = running
            start.append(latest)
    else:
        for t in due:
            if not running:
                start.append(t)
                running = True
            elif overlap is Overlap.BUFFER_ONE and buffered is None:
                buffered = t
                notes.append({"event": "buffered", "tick": t})
            else:
                skipped.append(t)
        notes += _skipped(skipped, "the previous run is still going")
    return Plan(cursor, buffered, tuple(start), stop_previous, tuple(notes))


def _skipped(ticks: list[float], reason: str) -> list[dict[str, Any]]:
    return [{"event": "skipped", "ticks": ticks, "reason": reason}] if ticks else []
