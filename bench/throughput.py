"""Our distributed runtime beside raw Celery, on the same Redis, in one invocation.

Usage:
    .venv/bin/python bench/throughput.py [--runs 100] [--steps 200] [--loop 200]
        [--chords 50] [--width 8] [--wide-chords 8] [--wide 50] [--starts 200] [--gates 20]
        [--raw-prefetch 4,1]
        [--rounds 3] [--ours-loglevel WARNING] [--redis-url redis://127.0.0.1:6379/15] [--json]

Needs Redis; the database in --redis-url is FLUSHED before and after. Every side keeps its
own worker subprocesses (prefork pool, concurrency 2, no heartbeat/gossip/mingle, log level
WARNING) for the whole invocation, idle while another side is measured:

  raw Celery  `celery worker` for bench/raw_celery.py, configured as
              ../shared/bench/celery_baseline.py is (JSON, acks_late, results in Redis,
              prefetch 4), on a queue of its own; `--raw-prefetch 4,1` adds a worker with
              our prefetch of 1.
  ours        `orchestrator worker -c 2` plus `orchestrator coordinator` (timers and the
              recovery sweep), hosting bench/flows.py.

Measures are interleaved: each one is taken on every side back to back, in an order that
flips every round, so a ratio compares runs seconds apart. These machines drift (the same
phase swings by 2x within minutes), and a ratio of phases minutes apart measured the drift.

What each side is asked to do:
  per-step latency  raw: one chain of --steps no-op tasks; ours: one run of the loop flow
                    with --steps iterations; wall time / steps.
  steps/s           raw: --runs chains of 10 no-op tasks in flight at once; ours: --runs
                    runs of Noop10 in flight (started with WorkflowRunner.run, waited with
                    RunHandle.result); 10 x runs / wall time.
  branches/s        raw: --chords chords of --width no-op tasks (+ a callback) in flight;
                    ours: --chords runs of a fan-out (Fan -> Parallel.map of --width no-op
                    branches -> Gather); again with --wide-chords of width --wide.
  history growth    ours: one loop run of --loop iterations; mean time per iteration of
                    the first 50 and the last 50, from the run's history (should be ~1.0).
  starts/s          raw: --starts chains of 10 no-op tasks sent back to back
                    (`chain(...).apply_async()`); ours: --starts runs of Noop10 started back
                    to back (`WorkflowRunner.run()`); starts / wall time of the sending loop
                    only (then, untimed, every one is waited for before the next measure).
  approve -> step   ours only (raw Celery has no gate): --gates runs parked at a gate, then
                    each in turn approve()d; from the moment before the call to the moment
                    the step after the gate started (its output is its own time.time()),
                    median and p95 in ms over all rounds' approvals.
  CPU per step      user + system CPU of each process tree (this client, the side's worker
                    main process and its pool, the coordinator, redis-server) over the
                    steps/s and the first branches/s measure, per step or branch.

Figures are medians over --rounds; a ratio is the median of the per-round ratios, with its
range.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: `bench` and `orchestrator` from the checkout

import psutil  # noqa: E402
import redis  # noqa: E402

WORKER_FLAGS = ["--without-heartbeat", "--without-gossip", "--without-mingle"]
POLL = 0.005  # how often a waiting handle looks at its run (seconds)
TIMEOUT = 600.0


# ---- subprocesses ------------------------------------------------------------------------


class Processes:
    """Subprocesses, each in its own process group, output kept in a log file."""

    def __init__(self, logdir: Path, env: dict[str, str]) -> None:
        self.logdir = logdir
        self.env = env
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> int:
        log = (self.logdir / f"{name}.log").open("wb")
        try:
            proc = subprocess.Popen(list(argv), env=env or self.env, cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self.procs.append((name, proc))
        return proc.pid

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Warm shutdown (SIGTERM to the group), then SIGKILL whatever is left of it."""
        for _, proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for _, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for _, proc in self.procs:  # the pool children too, even if the parent is gone
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.procs.clear()


@contextmanager
def processes(logdir: Path, env: dict[str, str]) -> Iterator[Processes]:
    procs = Processes(logdir, env)
    try:
        yield procs
    except BaseException:
        for name, _ in procs.procs:
            print(f"--- {name} log (tail) ---\n{procs.tail(name)}", file=sys.stderr)
        raise
    finally:
        procs.stop()


class CpuMeter:
    """CPU time (user + system) of process trees by role, to say what a step costs where."""

    def __init__(self, url: str, roles: dict[str, int]) -> None:
        pid = int(redis.Redis.from_url(url).info("server")["process_id"])
        self.roles = {"client": os.getpid(), **roles, "redis-server": pid}

    def _now(self) -> dict[str, float]:
        """Seconds so far, by role; a worker's pool children apart from its main process."""

        def cpu(procs: list[psutil.Process]) -> float:
            total = 0.0
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    t = p.cpu_times()
                    total += t.user + t.system
            return total

        out: dict[str, float] = {}
        for role, pid in self.roles.items():
            try:
                root = psutil.Process(pid)
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                root, children = None, []
            out[role] = cpu([root] if root else [])
            if role not in ("client", "redis-server"):
                out[f"{role} pool"] = cpu(children)
        return out

    @contextmanager
    def measure(self, into: dict[str, float], steps: int) -> Iterator[None]:
        """Fill `into` with CPU milliseconds per step (of `steps`) by role, over the body."""
        before = self._now()
        yield
        after = self._now()
        into.update({role: (after[role] - before[role]) * 1000 / steps for role in after})
        into["total"] = sum(into.values())


def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: stop the workers


# ---- the sides ------------------------------------------------------------------------------

Result = dict[str, Any]


class RawCelery:
    """The floor: raw Celery canvas, configured as ../shared/bench/celery_baseline.py."""

    def __init__(self, url: str, prefetch: int, procs: Processes) -> None:
        os.environ.update(BENCH_REDIS_URL=url, BENCH_PREFETCH=str(prefetch))
        from celery import chain, chord, group

        from bench.raw_celery import app, join, noop

        self.name = f"raw pf={prefetch}"
        self.queue = f"bench.raw.pf{prefetch}"
        self.chain, self.chord, self.group, self.join, self.noop = chain, chord, group, join, noop
        app.conf.update(broker_url=url, result_backend=url)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_PREFETCH": str(prefetch)}
        celery = str(Path(sys.executable).parent / "celery")
        pid = procs.start(f"raw-worker-pf{prefetch}",
                          [celery, "-A", "bench.raw_celery", "worker", "-c", "2", "-P",
                           "prefork", "-l", "WARNING", "-Q", self.queue, "-n",
                           f"raw-pf{prefetch}@%h", *WORKER_FLAGS], env)
        self.cpu = CpuMeter(url, {"worker": pid})

    def _sig(self, task: Any) -> Any:
        return task.s().set(queue=self.queue)

    def warm_up(self) -> None:
        self.group([self.chain(*[self._sig(self.noop) for _ in range(10)])
                    for _ in range(4)]).apply_async(queue=self.queue).get(timeout=120)

    def starts_s(self, n: int) -> Result:
        t = time.perf_counter()
        pending = [self.chain(*[self._sig(self.noop) for _ in range(10)]).apply_async()
                   for _ in range(n)]
        rate = n / (time.perf_counter() - t)
        # Untimed: polled, since get() on a few hundred pending results at once has been
        # seen to wait on pub/sub forever for results that were already stored.
        deadline = time.monotonic() + TIMEOUT
        for r in pending:
            while not r.ready():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"raw chain {r.id} did not finish")
                time.sleep(POLL)
        return {"starts_s": rate}

    def hop_ms(self, steps: int) -> Result:
        t = time.perf_counter()
        self.chain(*[self._sig(self.noop) for _ in range(steps)]).apply_async().get(
            timeout=TIMEOUT)
        return {"hop_ms": (time.perf_counter() - t) / steps * 1000}

    def steps_s(self, runs: int) -> Result:
        def start() -> list[Any]:
            return [self.chain(*[self._sig(self.noop) for _ in range(10)]).apply_async()
                    for _ in range(runs)]

        rate, cpu = timed(self.cpu, runs * 10, start, lambda r: r.get(timeout=TIMEOUT))
        return {"steps_s": rate, "cpu_ms_per_step": cpu}

    def branches_s(self, n: int, width: int) -> Result:
        def start() -> list[Any]:
            return [self.chord(self.group([self._sig(self.noop) for _ in range(width)]),
                               self._sig(self.join)).apply_async() for _ in range(n)]

        def finish(r: Any) -> None:
            got = r.get(timeout=TIMEOUT)
            assert got == width, f"chord of {width} joined {got}"

        rate, cpu = timed(self.cpu, n * width, start, finish)
        return {"branches_s": rate, "cpu_ms_per_branch": cpu}


class Ours:
    """`orchestrator worker -c 2` and `orchestrator coordinator`, driven by WorkflowRunner."""

    def __init__(self, url: str, procs: Processes, loglevel: str) -> None:
        env = {**os.environ, "ORCHESTRATOR_REDIS_URL": url,
               "ORCHESTRATOR_WORKFLOWS": "bench.flows", "PYTHONPATH": str(ROOT)}
        from bench.flows import fan_out, gated, loop, noop10
        from orchestrator import Settings, WorkflowRunner, create_app

        self.name = "ours"
        app = create_app(Settings.from_env(env))
        cli = [sys.executable, "-m", "orchestrator.cli"]
        worker = procs.start("ours-worker", [*cli, "worker", "-c", "2", "-l", loglevel,
                                             "-n", "bench-worker@%h", *WORKER_FLAGS], env)
        coordinator = procs.start("ours-coordinator", [*cli, "coordinator", "-l", loglevel,
                                                       "-n", "bench-coordinator@%h",
                                                       *WORKER_FLAGS], env)
        self.cpu = CpuMeter(url, {"worker": worker, "coordinator": coordinator})
        self.chains, self.loops, self.fans, self.gates = (
            WorkflowRunner(wf, app=app) for wf in (noop10, loop, fan_out, gated))

    def warm_up(self) -> None:
        for h in [self.chains.run() for _ in range(4)] + [self.fans.run({"width": 2})]:
            wait_done(h, 120)

    def starts_s(self, n: int) -> Result:
        t = time.perf_counter()
        handles = [self.chains.run() for _ in range(n)]
        rate = n / (time.perf_counter() - t)
        for h in handles:
            wait_done(h)
        return {"starts_s": rate}

    def approve_ms(self, n: int) -> list[float]:
        """approve() to the step after the gate starting, ms, for `n` runs in turn."""
        handles = [self.gates.run() for _ in range(n)]
        for h in handles:
            while h.status().value != "waiting":
                time.sleep(POLL)
        latencies = []
        for h in handles:
            t0 = time.time()
            h.approve(by="bench")
            latencies.append((wait_done(h).output - t0) * 1000)
        return latencies

    def hop_ms(self, steps: int) -> Result:
        t = time.perf_counter()
        h = self.loops.run({"times": steps})
        wait_done(h)
        hop_ms = (time.perf_counter() - t) / steps * 1000
        hist = h.history()
        return {"hop_ms": hop_ms, "hop_server_ms": (hist[-1]["at"] - hist[0]["at"]) / steps * 1000}

    def steps_s(self, runs: int) -> Result:
        rate, cpu = timed(self.cpu, runs * 10, lambda: [self.chains.run() for _ in range(runs)],
                          wait_done)
        return {"steps_s": rate, "cpu_ms_per_step": cpu}

    def branches_s(self, n: int, width: int) -> Result:
        def finish(h: Any) -> None:
            got = wait_done(h).output
            assert got == width, f"fan-out of {width} gathered {got}"

        rate, cpu = timed(self.cpu, n * width,
                          lambda: [self.fans.run({"width": width}) for _ in range(n)], finish)
        return {"branches_s": rate, "cpu_ms_per_branch": cpu}

    def growth(self, iterations: int) -> Result:
        h = self.loops.run({"times": iterations})
        res = wait_done(h)
        assert res.state["n"] == iterations, res.state
        return {"loop": per_iteration(h.history())}


def timed(meter: CpuMeter, count: int, start: Callable[[], list[Any]],
          finish: Callable[[Any], Any]) -> tuple[float, dict[str, float]]:
    """Start everything, finish each in turn: `count` per second, and CPU ms per one."""
    cpu: dict[str, float] = {}
    with meter.measure(cpu, count):
        t = time.perf_counter()
        for pending in start():
            finish(pending)
        rate = count / (time.perf_counter() - t)
    return rate, cpu


def wait_done(handle: Any, timeout: float = TIMEOUT, poll: float = POLL) -> Any:
    """`handle.result()`, looking every `poll` seconds (its own backoff grows to 250 ms,
    which would add up to a quarter second to a timed phase)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            res = handle.result(timeout=0)
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
            time.sleep(poll)
            continue
        if res.status.value != "completed":
            raise RuntimeError(f"run {handle.run_id} ended {res.status.value}: {res.error}")
        return res


def per_iteration(history: list[dict[str, Any]], window: int = 50) -> dict[str, float]:
    """Mean time between consecutive completions, over the first and last `window`."""
    ticks = [float(e["at"]) for e in history if e["event"] == "step_completed"]
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    if len(gaps) < 2:
        raise ValueError("the loop needs at least 3 iterations")
    window = min(window, len(gaps) // 2)
    first = statistics.fmean(gaps[:window]) * 1000
    last = statistics.fmean(gaps[-window:]) * 1000
    return {"iterations": len(ticks), "window": window, "first_ms": first, "last_ms": last,
            "last_over_first": last / first,
            "median_ms": statistics.median(gaps) * 1000}


def one_round(sides: list[Any], ours: Ours, a: argparse.Namespace, flip: bool) -> Result:
    """Every measure on every side, back to back; the order of sides flips with `flip`."""
    order = list(reversed(sides)) if flip else sides
    measures = [
        lambda side: side.hop_ms(a.steps),
        lambda side: side.steps_s(a.runs),
        lambda side: side.branches_s(a.chords, a.width),
        lambda side: {"wide_branches_s": side.branches_s(a.wide_chords, a.wide)["branches_s"]},
        lambda side: side.starts_s(a.starts),
    ]
    out: dict[str, Result] = {side.name: {} for side in sides}
    for measure in measures:
        for side in order:
            out[side.name].update(measure(side))
    out[ours.name].update(ours.growth(a.loop))
    out[ours.name]["approve_ms"] = ours.approve_ms(a.gates)
    return out


# ---- report -------------------------------------------------------------------------------

KEYS = ("hop_ms", "steps_s", "branches_s", "wide_branches_s", "starts_s")


def machine(url: str) -> dict[str, Any]:
    from importlib.metadata import version

    info = redis.Redis.from_url(url).info("server")
    return {"nproc": os.cpu_count(), "python": platform.python_version(),
            "redis": info.get("redis_version"), "celery": version("celery"),
            "kombu": version("kombu"), "platform": platform.platform()}


def print_table(report: dict[str, Any], a: argparse.Namespace) -> None:
    raws: dict[str, Result] = report["raw_celery"]
    us: Result = report["ours"]
    m = report["machine"]
    print(f"{m['nproc']} cores, Python {m['python']}, Redis {m['redis']}, "
          f"Celery {m['celery']}; worker pools prefork -c 2; medians of {a.rounds} "
          f"interleaved round(s)")
    print(f"{'':40}" + "".join(f"{h:>12}" for h in raws) + f"{'ours':>12}{'ours/raw':>10}")
    labels = {
        "hop_ms": f"per-step latency, {a.steps} hops (ms)",
        "steps_s": f"steps/s, {a.runs} x 10 in flight",
        "branches_s": f"branches/s, {a.chords} x {a.width}",
        "wide_branches_s": f"branches/s, {a.wide_chords} x {a.wide}",
        "starts_s": f"starts/s, {a.starts} back to back",
    }
    for key in KEYS:
        cells = "".join(f"{r[key]:12.2f}" for r in raws.values())
        ratio = report["ratios"][key]
        low, high = report["ratio_ranges"][key]
        spread = f" ({low:.2f}-{high:.2f})" if a.rounds > 1 else ""
        note = "  lower is better" if key == "hop_ms" else ("  < 0.8x" if ratio < 0.8 else "")
        print(f"{labels[key]:40}{cells}{us[key]:12.2f}{ratio:10.2f}{spread}{note}")
    g = us["loop"]
    print(f"loop of {g['iterations']:.0f}: first {g['window']:.0f} iterations "
          f"{g['first_ms']:.2f} ms each, last {g['window']:.0f} {g['last_ms']:.2f} ms (last/first "
          f"{g['last_over_first']:.2f}; median {g['median_ms']:.2f} ms)")
    print(f"ours from the run history: {us['hop_server_ms']:.2f} ms per step")
    ap = report["approve_ms"]
    print(f"ours, approve() -> the step after the gate started: median {ap['median']:.2f} ms, "
          f"p95 {ap['p95']:.2f} ms ({ap['n']} approvals; per-round medians "
          f"{ap['round_medians'][0]:.2f}-{ap['round_medians'][1]:.2f} ms)")
    for what, key in (("chain step", "cpu_ms_per_step"), ("fan-out branch", "cpu_ms_per_branch")):
        for side, r in [*raws.items(), ("ours", us)]:
            cpu = r[key]
            parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()
                              if k != "total" and v >= 0.005)
            print(f"CPU ms per {what:15} {side:10} {cpu['total']:5.2f} = {parts}")


def ratios(raw: Result, us: Result) -> dict[str, float]:
    out = {key: us[key] / raw[key] for key in KEYS}
    out["loop_last_over_first"] = us["loop"]["last_over_first"]
    return out


def _median(items: list[Any]) -> Any:
    """Median of each number across same-shaped dicts."""
    first = items[0]
    if isinstance(first, dict):
        return {k: _median([i[k] for i in items]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(items)
    return first


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100,
                        help="chains / runs of 10 no-op steps in flight (default 100)")
    parser.add_argument("--steps", type=int, default=200,
                        help="hops of the per-step latency chain / loop (default 200)")
    parser.add_argument("--loop", type=int, default=200,
                        help="iterations of the history-growth loop, at least 3 (default 200)")
    parser.add_argument("--chords", type=int, default=50, help="fan-outs in flight (default 50)")
    parser.add_argument("--width", type=int, default=8, help="branches each (default 8)")
    parser.add_argument("--wide-chords", type=int, default=8,
                        help="wide fan-outs in flight (default 8)")
    parser.add_argument("--wide", type=int, default=50, help="their width (default 50)")
    parser.add_argument("--starts", type=int, default=200,
                        help="runs / chains started back to back (default 200)")
    parser.add_argument("--gates", type=int, default=20,
                        help="runs approved one at a time, per round (default 20)")
    parser.add_argument("--raw-prefetch", default="4",
                        help="raw worker prefetch multiplier(s), comma-separated; the ratio "
                             "is taken against the first (default 4, as the baseline)")
    parser.add_argument("--ours-loglevel", default="WARNING",
                        help="log level of our worker and coordinator (default WARNING, "
                             "as the raw worker; `orchestrator worker` defaults to INFO)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15",
                        help="Redis to use; its database is flushed (default DB 15)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; report medians and the median of each "
                             "round's ratio with its range (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    a = parser.parse_args(argv)
    if a.loop < 3 or a.steps < 1 or a.rounds < 1 or a.starts < 1 or a.gates < 1:
        parser.error("--loop needs at least 3 iterations, --steps, --starts, --gates and "
                     "--rounds at least 1")
    prefetches = [int(p) for p in a.raw_prefetch.split(",") if p.strip()]

    signal.signal(signal.SIGTERM, _sigterm)
    client = redis.Redis.from_url(a.redis_url)
    report: dict[str, Any] = {"machine": machine(a.redis_url), "options": vars(a)}
    rounds: list[Result] = []
    client.flushdb()
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp, \
            processes(Path(tmp), dict(os.environ)) as procs:
        try:
            raws = [RawCelery(a.redis_url, pf, procs) for pf in prefetches]
            ours = Ours(a.redis_url, procs, a.ours_loglevel)
            for side in [*raws, ours]:  # consuming, both pool processes have run tasks
                side.warm_up()
            procs.check_alive()
            for n in range(a.rounds):
                by_side = one_round([*raws, ours], ours, a, flip=n % 2 == 1)
                procs.check_alive()
                rounds.append({"raw_celery": {r.name: by_side[r.name] for r in raws},
                               "ours": by_side[ours.name],
                               "approve_median": statistics.median(
                                   by_side[ours.name]["approve_ms"]),
                               "ratios": ratios(by_side[raws[0].name], by_side[ours.name])})
        finally:
            client.flushdb()
    # approve() latencies: every approval of every round, and each round's median.
    approvals = [ms for r in rounds for ms in r["ours"].pop("approve_ms")]
    report["approve_ms"] = {
        "n": len(approvals), "median": statistics.median(approvals),
        "p95": statistics.quantiles(approvals, n=20)[-1] if len(approvals) > 1 else approvals[0],
        "round_medians": [min(r["approve_median"] for r in rounds),
                          max(r["approve_median"] for r in rounds)]}
    for r in rounds:
        del r["approve_median"]
    # Medians over rounds; a ratio is the median of each round's own ratio.
    report.update(_median(rounds))
    report["ratio_ranges"] = {k: [min(r["ratios"][k] for r in rounds),
                                  max(r["ratios"][k] for r in rounds)]
                              for k in rounds[0]["ratios"]}
    report["rounds"] = rounds
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report, a)
    return report


if __name__ == "__main__":
    main()
