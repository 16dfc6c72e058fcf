"""Schedules: records in Redis fired by coordinators, one run per tick however many fire.

The tick rules are pure functions of (schedule, last tick, now), tested with an injected
clock (daylight-saving changes, catchup, overlap). The firer is tested over real Redis with
an injected `now` (deterministic: no waiting for the wall clock), and the whole thing with
real coordinator and worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis

from orchestrator import (
    Client,
    InvalidInput,
    Overlap,
    RunStatus,
    Schedule,
    ScheduleExists,
    ScheduleNotFound,
    Settings,
    UnknownWorkflow,
    create_app,
)
from orchestrator._schedule_firer import ScheduleFirer
from orchestrator._schedule_rules import Plan, Timing, check_name, plan, run_id_for
from orchestrator._steward import publish
from orchestrator._stores.redis import connect
from tests import flows
from tests.conftest import Cluster, free_port, wait_for
from tests.test_cli import cli, cli_json

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


# ---- the firer over real Redis, with an injected `now` ------------------------------------


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    """A Client on a published catalog (no worker: started runs wait in their queue, which
    is all overlap needs to see them as still going)."""
    settings = Settings(redis_url=redis_url)
    publish(connect(redis_url), [flows.gated, flows.slow], settings=settings)
    c = Client(settings=settings)
    yield c
    c.close()


@pytest.fixture
def firer(redis_url: str) -> Iterator[ScheduleFirer]:
    """What a coordinator runs each pass, in this process, so the test says what time it is."""
    app = create_app(Settings(redis_url=redis_url), import_modules=False)
    f = ScheduleFirer(app.runtime, connect(redis_url))
    yield f
    f.redis.close()
    app.runtime.close()


def _status(client: Client, run_id: str) -> RunStatus:
    return client.attach(run_id, "Gated").status()


def _events(s: Schedule) -> list[str]:
    return [n["event"] for n in s.notes]


def test_overlap_policies_on_real_runs(client: Client, firer: ScheduleFirer) -> None:
    base = 10 * (int(firer.store.now()) // 10 + 1)
    for policy in Overlap:
        client.schedules.create(policy.value, "Gated", every=10, overlap=policy)
        # One cursor for all, whichever side of a multiple of 10 each was made on.
        firer.store.update(policy.value, lambda s: s.model_copy(update={"last_tick": base - 1}))
    assert firer.fire_due(base) == 4  # every policy starts its first tick
    first = {p: run_id_for(p.value, base) for p in Overlap}
    assert firer.fire_due(base + 10) == 2  # the first runs wait at their gates
    assert _events(client.schedules.get("skip")) == ["skipped"]
    assert client.schedules.get("allow").last_run_id == run_id_for("allow", base + 10)
    buffer_one = client.schedules.get("buffer_one")
    assert buffer_one.buffered == base + 10 and _events(buffer_one) == ["buffered"]
    assert _status(client, first[Overlap.CANCEL_OTHER]) is RunStatus.STOPPED
    assert client.schedules.get("cancel_other").last_run_id == run_id_for("cancel_other",
                                                                          base + 10)
    # The previous runs end: buffer_one starts the tick it kept, before the next tick.
    for policy in (Overlap.SKIP, Overlap.BUFFER_ONE):
        client.attach(first[policy], "Gated").stop()
    assert firer.fire_due(base + 15) == 1
    assert client.schedules.get("buffer_one").last_run_id == run_id_for("buffer_one", base + 10)
    assert firer.fire_due(base + 20) == 3  # skip, allow, cancel_other; buffer_one buffers
    assert client.schedules.get("skip").last_run_id == run_id_for("skip", base + 20)


def test_catchup_and_pause_resume_trigger_delete(client: Client, firer: ScheduleFirer) -> None:
    created = client.schedules.create("late", "Gated", every=10, overlap="allow", catchup=35)
    base = Timing(every=10).next_after(created.last_tick) or 0
    # Back after a long outage: the ticks of the last 35 s start, once each.
    assert firer.fire_due(base + 100) == 4
    assert firer.fire_due(base + 100) == 0
    late = client.schedules.get("late")
    assert late.last_run_id == run_id_for("late", base + 100)
    assert [(n["event"], n["from"]) for n in late.notes] == [("missed", base)]
    client.schedules.delete("late")

    client.schedules.create("held", "Gated", every=10, input={"approvers": ["ana"]})
    assert client.schedules.pause("held").paused
    assert firer.fire_due(base + 1000) == 0
    resumed = client.schedules.resume("held")  # ticks that fell in the pause are not started
    assert not resumed.paused and resumed.last_tick >= created.last_tick
    handle = client.schedules.trigger("held")  # now, whatever the overlap policy
    assert handle.run_id.startswith("sched-held-manual-")
    assert handle.record().input == {"approvers": ["ana"], "min_approvals": 1, "timeout": None,
                                     "on_timeout": None, "on_reject": None}
    # The triggered run is the one the next tick's overlap (skip) looks at.
    assert firer.fire_due(resumed.last_tick + 10) == 0
    assert _events(client.schedules.get("held")) == ["skipped"]

    client.schedules.delete("held")
    assert client.schedules.list() == []
    for verb in ("get", "pause", "resume", "trigger", "delete"):
        with pytest.raises(ScheduleNotFound, match="no schedule named 'held'"):
            getattr(client.schedules, verb)("held")
    assert not handle.status().is_terminal  # the runs a schedule started go on


def test_a_claim_is_carried_out_once_by_whichever_firer_gets_there(
        client: Client, firer: ScheduleFirer, redis_url: str) -> None:
    created = client.schedules.create("claimed", "Slow", every=10, overlap="allow")
    base = Timing(every=10).next_after(created.last_tick) or 0
    # A coordinator claimed a tick and died before starting its run.
    stored = firer.store.get("claimed")
    run_id = run_id_for("claimed", base)
    firer.store.replace(stored, stored.schedule.model_copy(update={
        "last_tick": base, "starting": [run_id], "last_run_id": run_id}))
    app = create_app(Settings(redis_url=redis_url), import_modules=False)
    other = ScheduleFirer(app.runtime, connect(redis_url))
    try:
        assert other.fire_due(base + 1) == 1 and firer.fire_due(base + 1) == 0
        assert firer.fire_due(base + 10) + other.fire_due(base + 10) == 1  # one run per tick
    finally:
        other.redis.close()
        app.runtime.close()
    assert client.schedules.get("claimed").starting == []
    assert client.attach(run_id, "Slow").record().input == {"seconds": 0.25}


def test_bad_input_is_refused_before_anything_is_stored(client: Client) -> None:
    with pytest.raises(UnknownWorkflow, match="'Nope'"):
        client.schedules.create("s", "Nope", every=5)
    with pytest.raises(InvalidInput, match="min_approvals"):
        client.schedules.create("s", "Gated", every=5, input={"min_approvals": "two"})
    with pytest.raises(ValueError, match="overlap must be one of"):
        client.schedules.create("s", "Gated", every=5, overlap="sometimes")
    for catchup in (0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="catchup must be at least 1 second"):
            client.schedules.create("s", "Gated", every=5, catchup=catchup)
    assert client.schedules.list() == []
    client.schedules.create("s", "Gated", cron="0 3 * * *", timezone="Europe/Berlin")
    with pytest.raises(ScheduleExists, match="'s' exists already"):
        client.schedules.create("s", "Slow", every=5)
    assert [t.utcoffset() is not None and t.hour for t in
            client.schedules.get("s").next_fire_times(2)] == [3, 3]


def test_cli_errors_are_one_line_with_their_exit_codes(client: Client, redis_url: str) -> None:
    def code(*args: str, url: str = redis_url) -> tuple[int, str]:
        proc = cli(url, "schedules", *args, check=False)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        return proc.returncode, proc.stderr

    assert code("create", "s", "Nope", "--every", "5")[0] == 3
    for args, message in [
        (["--cron", "0 25 * * *"], "Bad hour"),
        (["--cron", "0 3 * * *", "--timezone", "Europe/Atlantis"], "unknown time zone"),
        (["--every", "5", "--input", "{"], "--input is not valid JSON"),
        (["--every", "5", "--input", '{"approvers": "ana"}'], "approvers: 'ana' is not of"),
        (["--every", "5", "--cron", "* * * * *"], "not both"),
    ]:
        returncode, stderr = code("create", "s", "Gated", *args)
        assert returncode == 2 and message in stderr
    assert code("trigger", "nothing") == (3, "error: no schedule named 'nothing'\n")
    assert code("list", url=f"redis://127.0.0.1:{free_port()}/0")[0] == 5
    assert cli_json(redis_url, "schedules", "list") == []


# ---- real coordinators ------------------------------------------------------------------


def _scheduled_runs(rclient: redis.Redis, name: str) -> list[str]:
    ids = (i.decode() for i in rclient.zrange("orchestrator:runs", 0, -1))
    return sorted(i for i in ids if i.startswith(f"sched-{name}-"))


def test_three_coordinators_start_exactly_one_run_per_tick(
        cluster_factory: Any, rclient: redis.Redis) -> None:
    c: Cluster = cluster_factory()
    # Started together, then waited for: one after the other would take three times as long.
    coordinators = [c._start("coordinator", f"coord{i}", "-c", "2") for i in range(3)]
    worker = c._start("worker", "w1", "-c", "2")
    for proc in [*coordinators, worker]:
        c.wait_ready(proc)
    client = Client(settings=c.settings)
    schedules = client.schedules
    created = schedules.create("every-second", "Slow", every=1, input={"seconds": 0},
                               overlap="allow")
    wait_for(lambda: len(_scheduled_runs(rclient, "every-second")) >= 10, 30,
             what=f"10 ticks\n{c.logs()}")
    schedules.pause("every-second")

    def logged() -> list[str]:
        return sorted(line.rsplit(" ", 1)[1] for p in coordinators
                      for line in p.log.read_text().splitlines()
                      if "schedule every-second: started run" in line)

    # Each run was created by exactly one coordinator (the others found it existed). A
    # pass under way when the pause landed may still add a run, and a coordinator logs a
    # start just after making it: wait until the runs and the log lines agree (a run
    # started twice never would).
    wait_for(lambda: logged() == sorted(_scheduled_runs(rclient, "every-second")), 15,
             what=f"each run logged as started once\n{c.logs()}")
    ticks = [int(r.rsplit("-", 1)[1]) for r in _scheduled_runs(rclient, "every-second")]
    # Consecutive seconds from the first after the schedule was made: none missed.
    assert ticks == list(range(int(created.created_at) + 1, ticks[0] + len(ticks)))
    client.close()


def test_cli_schedule_on_a_cluster_skips_ticks_while_its_run_waits(
        cluster: Cluster, redis_url: str, rclient: redis.Redis) -> None:
    cli(redis_url, "schedules", "create", "gate", "Gated", "--cron", "* * * * * *",
        "--timezone", "Europe/Berlin")  # every second (six fields: seconds first)
    listed = cli_json(redis_url, "schedules", "list")
    assert [(s["name"], s["overlap"], s["timezone"], len(s["next"])) for s in listed] == [
        ("gate", "skip", "Europe/Berlin", 3)]
    first = wait_for(lambda: _scheduled_runs(rclient, "gate"), 30, what="a first run")[0]
    wait_for(lambda: "skipped" in [n["event"] for n in cli_json(
        redis_url, "schedules", "list")[0]["notes"]], 30, what="a tick skipped while it waits")
    assert _scheduled_runs(rclient, "gate") == [first]
    cli(redis_url, "approve", first, "--as", "ops-lead")
    wait_for(lambda: len(_scheduled_runs(rclient, "gate")) == 2, 30, what="the next tick's run")
    table = cli(redis_url, "schedules", "list").stdout
    assert "gate" in table and "Gated" in table and "* * * * * * (Europe/Berlin)" in table
    cli(redis_url, "schedules", "pause", "gate")
    triggered = cli_json(redis_url, "schedules", "trigger", "gate")["run_id"]
    assert triggered in _scheduled_runs(rclient, "gate")
    assert cli(redis_url, "schedules", "delete", "gate").stdout.strip() == "gate: deleted"
    assert cli_json(redis_url, "schedules", "list") == []
