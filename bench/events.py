"""Events: Redis memory per run waiting for an event (and per sleeping run, side by side),
and latency from send() to the step after the wait starting; what a send() costs its caller.

Usage: python bench/events.py [--runs 10000] [--sleepers 10000] [--sends 200] [--burst 1000]
                              [--duplicates 1000] [--redis-url URL] [--json]
Needs Redis (default redis://127.0.0.1:6379/15, which it flushes). Starts one worker and
one coordinator as subprocesses (`orchestrator worker|coordinator`).

Phases, one after the other:
  park      `--runs` orders wait for `paid` (a 3-field Payment, 7-day timeout), then
            `--sleepers` runs sleep on `Wait(Sleep(3600), ...)`: broker messages once all
            are parked, Redis `used_memory` and keys per run.
  latency   `--sends` sends, one at a time, to parked orders, through the handle of the app
            that hosts the workflow (RunHandle.send) and through `Client().send` (which
            checks the payload against the published schema): from the moment before the
            call to the `Ship` step starting on the worker (it RPUSHes `time.time()`, the
            bench BLPOPs it), and the call's own duration.
  duplicate the same sends again, same keys (a webhook's retry): "duplicate", nothing stored.
  burst     `--burst` sends back to back from one client to parked orders (each one delivered
            and so starting a step on the worker): sends per second and client CPU per send.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel
from redis.connection import AbstractConnection

from orchestrator import (
    END,
    START,
    Client,
    Event,
    Next,
    RunStatus,
    Settings,
    Sleep,
    Wait,
    Workflow,
    WorkflowRunner,
    create_app,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the worker imports `bench.events`

from bench.nodes import start_node, stop_nodes, wait_until  # noqa: E402

PREFIX = "events:"
QUEUES = (b"orchestrator.steps", b"orchestrator.coordinator")


class Order(BaseModel):
    order_id: str


class Payment(BaseModel):
    amount_cents: int
    currency: str
    psp_reference: str


@functools.cache
def _redis() -> redis.Redis:  # one connection per worker pool process, made after the fork
    return redis.Redis.from_url(os.environ["ORCHESTRATOR_REDIS_URL"])


def _await_payment(ctx: Any) -> Wait:
    return Wait(Event("paid", model=Payment, timeout=7 * 86400, on_timeout="Cancel"), "Ship")


def _ship(ctx: Any) -> Wait:
    # The moment the step after the wait starts, where the bench BLPOPs it; then the order
    # waits on (for `delivered`), so a webhook's retry of `paid` finds it alive.
    pipe = _redis().pipeline(transaction=False)
    pipe.rpush(f"{PREFIX}{ctx.run_id}:shipped", repr(time.time()))
    pipe.incr(f"{PREFIX}shipped")
    pipe.execute()
    return Wait(Event("delivered"), "Close")


orders = (Workflow("BenchOrders").input(Order).events(paid=Payment, delivered=None)
          .persistence(key_prefix=PREFIX)
          .flow({START: _await_payment, "Ship": _ship, "Close": lambda ctx: END,
                 "Cancel": lambda ctx: Next(END, output="cancelled")}))

sleepers = (Workflow("BenchEventSleepers").persistence(key_prefix=PREFIX)
            .flow({START: lambda ctx: Wait(Sleep(3600), "Done"), "Done": lambda ctx: END}))


class RoundTrips:
    """Requests this process writes to Redis (a pipeline or a script is one)."""

    def __init__(self) -> None:
        self.count = 0
        original = AbstractConnection.send_packed_command

        def counted(conn: Any, command: Any, check_health: bool = True) -> None:
            self.count += 1
            original(conn, command, check_health)

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def _ms(values: list[float]) -> tuple[float, float]:
    return round(statistics.median(values) * 1000, 2), round(_p95(values) * 1000, 2)


def _db_bytes(client: redis.Redis) -> int:
    """MEMORY USAGE summed over this database's keys: unlike `used_memory`, blind to other
    databases of a shared server (it leaves out the server's own per-key overheads)."""
    total, pipe = 0, client.pipeline(transaction=False)
    for key in client.scan_iter(count=1000):
        pipe.memory_usage(key, samples=0)
        if len(pipe) >= 1000:
            total += sum(b or 0 for b in pipe.execute())
    return total + sum(b or 0 for b in pipe.execute())


def _park(client: redis.Redis, start: Callable[[int], Any], count: Callable[[], int],
          n: int, what: str) -> dict[str, Any]:
    mem, keys, db = client.info("memory")["used_memory"], client.dbsize(), _db_bytes(client)
    t0 = time.perf_counter()
    handles = [start(i) for i in range(n)]
    wait_until(lambda: count() == n and not any(client.llen(q) for q in QUEUES), 1200,
               f"{what} to park")
    return {"handles": handles, "seconds": time.perf_counter() - t0,
            "bytes": (client.info("memory")["used_memory"] - mem) / n,
            "keys": (client.dbsize() - keys) / n, "db_bytes": (_db_bytes(client) - db) / n,
            "broker": sum(client.llen(q) for q in QUEUES) + client.hlen("unacked")}


def _sample(client: redis.Redis, run_id: str) -> dict[str, int]:
    """The run's own keys and what each takes (MEMORY USAGE, bytes)."""
    found = client.scan_iter(match=f"{PREFIX}run:{{{run_id}}}*", count=1000)
    return {k.decode().removeprefix(f"{PREFIX}run:{{{run_id}}}") or "(hash)":
            int(client.memory_usage(k) or 0) for k in sorted(found)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000, help="orders waiting for `paid`")
    parser.add_argument("--sleepers", type=int, default=10_000,
                        help="runs on Wait(Sleep(3600)) beside them (0: none)")
    parser.add_argument("--sends", type=int, default=200,
                        help="timed sends, each way (RunHandle, Client)")
    parser.add_argument("--burst", type=int, default=1000, help="back-to-back sends")
    parser.add_argument("--duplicates", type=int, default=1000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.runs < 2 * args.sends + args.burst or min(args.sends, args.burst) < 2:
        parser.error("--runs must cover 2 x --sends + --burst, each at least 2")

    load = round(os.getloadavg()[0], 2)  # the machine may be shared: read figures beside it
    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    env = {**os.environ, "ORCHESTRATOR_REDIS_URL": args.redis_url,
           "ORCHESTRATOR_WORKFLOWS": "bench.events", "PYTHONPATH": str(ROOT)}
    os.environ.update({k: env[k] for k in ("ORCHESTRATOR_REDIS_URL", "ORCHESTRATOR_WORKFLOWS")})
    procs = [start_node("coordinator", env, "bench-coord"),
             start_node("worker", env, "bench-worker")]
    try:
        app = create_app(Settings.from_env(), [orders, sleepers], import_modules=False)
        runner = WorkflowRunner(orders, app=app)
        store = runner.store
        waiting = lambda wf: store.count_runs(wf)[RunStatus.WAITING]  # noqa: E731
        parked = _park(client, lambda i: runner.run({"order_id": f"A-{i:06}"}, run_id=f"o{i}"),
                       lambda: waiting("BenchOrders"), args.runs, "orders")
        sample = _sample(client, "o0")
        doc_bytes = client.hstrlen(f"{PREFIX}run:{{o0}}", "doc")
        asleep = None
        if args.sleepers:
            sleep_runner = WorkflowRunner(sleepers, app=app)
            asleep = _park(client, lambda i: sleep_runner.run(run_id=f"s{i}"),
                           lambda: waiting("BenchEventSleepers"), args.sleepers, "sleepers")

        handles = parked["handles"]
        api = Client()
        wait_until(api.workflows, 30, "the catalog")  # the worker publishes it
        trips = RoundTrips()

        def timed(send: Callable[[int, str], str], runs: range, expect: str,
                  key: Callable[[int], str]) -> tuple[list[float], list[float], float]:
            """(send -> next step started, call durations, round trips per call)"""
            to_step, calls, sent_trips = [], [], 0
            for i in runs:
                trips0, t0, p0 = trips.count, time.time(), time.perf_counter()
                got = send(i, key(i))
                calls.append(time.perf_counter() - p0)
                sent_trips += trips.count - trips0
                if got != expect:
                    raise SystemExit(f"send to o{i}: {got!r}, expected {expect!r}")
                if expect == "delivered":
                    popped = client.blpop([f"{PREFIX}o{i}:shipped"], 30)
                    if popped is None:
                        raise TimeoutError(f"the step after the wait of o{i}")
                    to_step.append(float(popped[1]) - t0)
            return to_step, calls, sent_trips / len(runs)

        def pay(i: int) -> dict[str, Any]:
            return {"amount_cents": 1999 + i, "currency": "EUR", "psp_reference": f"psp_{i:08}"}

        by_handle = lambda i, k: handles[i].send("paid", pay(i), key=k)  # noqa: E731
        by_client = lambda i, k: api.send(f"o{i}", "paid", pay(i), key=k)  # noqa: E731
        webhook = lambda i: f"evt_{i:08}"  # noqa: E731
        n = args.sends
        h_step, h_call, h_trips = timed(by_handle, range(n), "delivered", webhook)
        c_step, c_call, c_trips = timed(by_client, range(n, 2 * n), "delivered", webhook)

        # The retries: every delivered order has moved on to wait for `delivered`.
        wait_until(lambda: all(h.status() is RunStatus.WAITING for h in handles[:2 * n]), 60,
                   "the shipped orders to wait again")
        version = client.hget(f"{PREFIX}run:{{o0}}", "v")
        dup_runs = [i % (2 * n) for i in range(args.duplicates)]
        t0, c0 = time.perf_counter(), time.process_time()
        _, d_call, d_trips = timed(lambda i, k: by_handle(dup_runs[i], k), range(args.duplicates),
                                   "duplicate", lambda i: webhook(dup_runs[i]))
        d_wall, d_cpu = time.perf_counter() - t0, time.process_time() - c0
        _, dc_call, dc_trips = timed(lambda i, k: by_client(dup_runs[i], k),
                                     range(args.duplicates), "duplicate",
                                     lambda i: webhook(dup_runs[i]))
        if client.hget(f"{PREFIX}run:{{o0}}", "v") != version:
            raise SystemExit("a duplicate send wrote to the run")

        # One client, back to back, each send delivered (a step starts on the worker for each).
        burst = range(2 * n, 2 * n + args.burst)
        shipped0 = int(client.get(f"{PREFIX}shipped") or 0)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in burst:
            if by_handle(i, webhook(i)) != "delivered":
                raise SystemExit(f"burst send to o{i} not delivered")
        b_wall, b_cpu = time.perf_counter() - t0, time.process_time() - c0
        wait_until(lambda: int(client.get(f"{PREFIX}shipped") or 0) - shipped0 == args.burst,
                   300, "the burst's next steps")
        b_drain = time.perf_counter() - t0

        result: dict[str, Any] = {
            "load_average_1min_at_start": load,
            "parked_orders": args.runs, "seconds_to_park_orders": round(parked["seconds"], 1),
            "broker_messages_while_parked": parked["broker"],
            "redis_bytes_per_waiting_order": round(parked["bytes"]),
            "redis_keys_per_waiting_order": round(parked["keys"], 2),
            "memory_usage_of_keys_per_waiting_order": round(parked["db_bytes"]),
            "waiting_order_keys_bytes": sample, "waiting_order_record_json_bytes": doc_bytes,
        }
        if asleep is not None:
            result.update({
                "sleeping_runs": args.sleepers,
                "seconds_to_park_sleepers": round(asleep["seconds"], 1),
                "broker_messages_while_all_parked": asleep["broker"],
                "redis_bytes_per_sleeping_run": round(asleep["bytes"]),
                "redis_keys_per_sleeping_run": round(asleep["keys"], 2),
                "memory_usage_of_keys_per_sleeping_run": round(asleep["db_bytes"]),
            })
        result.update({
            "sends_timed_each_way": n,
            "handle_send_to_next_step_ms_median_p95": _ms(h_step),
            "handle_send_call_ms_median_p95": _ms(h_call),
            "handle_send_round_trips": round(h_trips, 2),
            "client_send_to_next_step_ms_median_p95": _ms(c_step),
            "client_send_call_ms_median_p95": _ms(c_call),
            "client_send_round_trips": round(c_trips, 2),
            "duplicate_sends": args.duplicates,
            "handle_duplicate_call_ms_median_p95": _ms(d_call),
            "handle_duplicates_per_s": round(args.duplicates / d_wall),
            "handle_duplicate_client_cpu_ms": round(d_cpu / args.duplicates * 1000, 3),
            "handle_duplicate_round_trips": round(d_trips, 2),
            "client_duplicate_call_ms_median_p95": _ms(dc_call),
            "client_duplicate_round_trips": round(dc_trips, 2),
            "burst_sends": args.burst,
            "burst_sends_per_s": round(args.burst / b_wall),
            "burst_client_cpu_ms_per_send": round(b_cpu / args.burst * 1000, 3),
            "burst_seconds_until_every_next_step_started": round(b_drain, 2),
        })
        print(json.dumps(result) if args.json else
              "\n".join(f"{k:46} {v}" for k, v in result.items()))
    finally:
        stop_nodes(procs)


if __name__ == "__main__":
    main()
