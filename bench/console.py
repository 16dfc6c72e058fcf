"""The console and the JSON API over 100,000 runs: milliseconds per request, by route.

Usage: python bench/console.py [--runs 100000] [--requests 50] [--redis-url URL] [--json]
Needs Redis (default redis://127.0.0.1:6379/12, FLUSHED before and after).

How the runs are made: a few template runs of each workflow (BuildAndDeploy, under its
own `deploy:` prefix, and Nightly, under the default one, so an unfiltered list merges two
stores) run for real in-process on the RedisStore: one completes, one waits at its gate,
one is rejected there and fails. The database is then flushed and filled with clones: for
each run the engine's own `start` decision goes through `RedisStore.create`, then one
`RedisStore.commit` takes it from that record to the template's final one (its history
entries after the start, times shifted). Both are the store's real scripts with the keys
and arguments the store computes itself, only queued in pipelines of `--batch` runs, so
the indexes (by status, workflow, both, ids, gates, waits, totals, expiry) are exactly
those that real runs leave. Most runs complete; `--waiting` and `--failed` say how many
in a hundred wait at a gate or fail.

The console runs in this process (uvicorn in a thread, as `orchestrator console` serves
it); requests carry an API token of ops-lead (operator, group ops: the approver of every
gate here). Each route is requested `--requests` times over
one keep-alive connection after a warm-up; routes the console does not have (404) are
reported as missing, not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator import (  # noqa: E402
    END,
    START,
    HumanApproval,
    Next,
    RunStatus,
    Settings,
    Wait,
    Workflow,
    WorkflowRunner,
)
from orchestrator import _engine as engine  # noqa: E402
from orchestrator._console._auth import SESSION_COOKIE, Auth, AuthOptions  # noqa: E402
from orchestrator._identity import Users  # noqa: E402
from orchestrator._records import RunRecord  # noqa: E402
from orchestrator._runner import local_runtime  # noqa: E402
from orchestrator._steward import entry_of, publish  # noqa: E402
from orchestrator._stores import RedisStore  # noqa: E402
from workers.deploy import build_and_deploy  # noqa: E402


class NightlyInput(BaseModel):
    day: int
    gated: bool = False


def report(ctx: Any) -> Wait | str:
    if ctx.input.gated:
        return Wait(HumanApproval(approvers=["group:ops"], prompt="Publish the report?"),
                    "Publish")
    return "Publish"


def publish_report(ctx: Any) -> Next:
    return Next(END, output={"day": ctx.input.day, "rows": 1200})


nightly = Workflow("Nightly", "A nightly report").input(NightlyInput).flow({
    START: "Report", "Report": report, "Publish": publish_report,
})

WORKFLOWS = (build_and_deploy, nightly)
SHARE = {"BuildAndDeploy": 0.8, "Nightly": 0.2}


def _input(wf: Workflow, i: int, gated: bool) -> dict[str, Any]:
    if wf is build_and_deploy:
        return {"repo": f"acme/service-{i % 997}",
                "environment": "production" if gated else "staging"}
    return {"day": i, "gated": gated}


class Template:
    """A real run's start and end, to clone: (kind, final record, history after start)."""

    def __init__(self, wf: Workflow, kind: str, final: RunRecord,
                 rest: list[dict[str, Any]]) -> None:
        self.wf, self.kind, self.final, self.rest = wf, kind, final, rest
        self.footprint: set[tuple[str, ...]] = set()
        self.clones: list[str] = []
        self.starts: list[str] = []


def footprint(client: redis.Redis, run_id: str) -> set[tuple[str, ...]]:
    """Where a run is in Redis: the index keys that hold it, and its own keys (with the id
    replaced, and whether they expire) and the record's history count."""
    out: set[tuple[str, ...]] = set()
    for raw in client.scan_iter(count=2000):
        key = raw.decode()
        if "run:{" in key:
            if "{" + run_id + "}" in key:
                ttl = client.pttl(key)
                out.add(("own", key.replace(run_id, "ID"), "expires" if ttl > 0 else "kept"))
            continue
        kind = client.type(key).decode()
        member = ((kind == "zset" and client.zscore(key, run_id) is not None)
                  or (kind == "set" and client.sismember(key, run_id))
                  or (kind == "hash" and client.hexists(key, run_id)))
        if member:
            out.add(("index", kind, key))
    for raw in client.scan_iter(match="*run:{" + run_id + "}", count=2000):
        out.add(("hn", str(int(client.hget(raw, "hn") or 0))))
    return out


def make_templates(url: str) -> list[Template]:
    out = []
    settings = Settings.from_env()
    for wf in WORKFLOWS:
        store = RedisStore(url, wf.persistence_options.key_prefix)
        runtime = local_runtime(store, settings)
        try:
            runner = WorkflowRunner(wf, runtime=runtime)
            for kind in ("completed", "waiting", "failed"):
                handle = runner.run(_input(wf, 0, kind != "completed"),
                                    run_id=f"tmpl-{wf.name}-{kind}")
                if kind == "completed":
                    handle.result(timeout=60)
                else:
                    deadline = time.monotonic() + 60
                    while handle.status() is not RunStatus.WAITING:
                        assert time.monotonic() < deadline, f"{wf.name} {kind}: no gate"
                        time.sleep(0.02)
                    if kind == "failed":
                        handle.reject("ops-lead" if wf is build_and_deploy else "alice",
                                      "not this one", groups=["ops"])
                        handle.result(timeout=60)
                final = store.load(handle.run_id).record
                assert final is not None and final.status.value == kind, (wf.name, final)
                history = store.history(handle.run_id)
                started = engine.start(entry_of(wf).spec(), "x", final.input, {}, 0.0)
                rest = [{k: v for k, v in h.items() if k not in ("n", "mac", "prev")}
                        for h in history[len(started.history):]]
                out.append(Template(wf, kind, final, rest))
        finally:
            runtime.close()
    client = redis.Redis.from_url(url)
    for t in out:
        t.footprint = footprint(client, t.final.run_id)
        # The counters of task starts a worker leaves (begin_task), kept retain_seconds.
        t.starts = sorted(k.split(":starts:", 1)[1] for tag, k, *_ in t.footprint
                          if tag == "own" and ":starts:" in k)
    client.close()
    return out


class _Queued:
    """A store script that queues its call on a pipeline (the store's own keys and
    arguments) and answers as if it had succeeded; the pipeline's replies are checked."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.pipe: Any = None

    def __call__(self, keys: list[str], args: list[Any]) -> int:
        self.script(keys=keys, args=args, client=self.pipe)
        return 1


def fill(url: str, templates: list[Template], runs: int, waiting_pct: int, failed_pct: int,
         batch: int) -> dict[str, dict[str, int]]:
    settings = Settings.from_env()
    stores = {wf.name: RedisStore(url, wf.persistence_options.key_prefix) for wf in WORKFLOWS}
    specs = {wf.name: entry_of(wf).spec() for wf in WORKFLOWS}
    initial = {wf.name: entry_of(wf).initial_state for wf in WORKFLOWS}
    queued = {}
    for name, store in stores.items():
        queued[name] = (_Queued(store._create), _Queued(store._commit))
        store._create, store._commit = queued[name]  # type: ignore[method-assign]
    by = {(t.wf.name, t.kind): t for t in templates}
    made: dict[str, dict[str, int]] = {}
    client = redis.Redis.from_url(url)
    t0 = float(client.time()[0]) - runs * 0.5  # runs 0.5 s apart, ending about now
    order = list(SHARE)
    pipe = client.pipeline(transaction=False)
    pending = 0
    for i in range(runs):
        name = order[0] if (i % 10) < SHARE[order[0]] * 10 else order[1]
        slot = (i * 37) % 100
        kind = ("waiting" if slot < waiting_pct else
                "failed" if slot < waiting_pct + failed_pct else "completed")
        tmpl = by[(name, kind)]
        store = stores[name]
        for q in queued[name]:
            q.pipe = pipe
        now = t0 + i * 0.5
        run_id = f"{name[:5].lower()}-{i:06d}-{(i * 2654435761) % 2**32:08x}"
        if not tmpl.clones:
            tmpl.clones.append(run_id)
        data = _input(tmpl.wf, i, kind != "completed")
        d = engine.start(specs[name], run_id, data, dict(initial[name]), now, None,
                         "ops-lead", "api")
        assert d.record is not None
        store.create(d.record, d.history, engine.next_due(d.record, settings.redispatch_after,
                                                          settings.join_after))
        shift = now - tmpl.final.created_at
        final = tmpl.final.model_copy(deep=True, update={
            "run_id": run_id, "input": data, "created_at": now,
            "updated_at": tmpl.final.updated_at + shift})
        if final.gate is not None:
            final.gate.opened_at += shift
        rest = [{**h, "at": h["at"] + shift} if "at" in h else h for h in tmpl.rest]
        store.commit(d.record, 1, final, rest, None)
        for task in tmpl.starts:
            key = f"{store._rec(run_id)}:starts:{task}"
            pipe.incr(key)
            pipe.expire(key, store.retain_seconds)
        made.setdefault(name, {}).setdefault(kind, 0)
        made[name][kind] += 1
        pending += 1
        if pending == batch or i == runs - 1:
            replies = pipe.execute()
            bad = [r for r in replies if r is not True and r != 1]
            assert not bad, f"a create or commit did not apply: {bad[:5]}"
            pipe = client.pipeline(transaction=False)
            pending = 0
    client.close()
    return made


def serve(settings: Settings) -> tuple[Any, str]:
    import socket

    import uvicorn

    from orchestrator._console import create_console

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_console(settings), host="127.0.0.1",
                                           port=port, log_level="warning",
                                           proxy_headers=False))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the console did not start"
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def timed(http: httpx.Client, path: str, params: dict[str, Any], n: int) -> dict[str, Any]:
    first = http.get(path, params=params)
    if first.status_code == 404:
        return {"route": path, "params": params, "missing": True}
    assert first.status_code == 200, (path, params, first.status_code, first.text[:300])
    for _ in range(3):
        http.get(path, params=params)
    ms = []
    for _ in range(n):
        t = time.perf_counter()
        response = http.get(path, params=params)
        ms.append((time.perf_counter() - t) * 1000)
        assert response.status_code == 200
    ms.sort()
    return {"route": path, "params": params, "bytes": len(first.content),
            "median_ms": round(statistics.median(ms), 1),
            "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--waiting", type=int, default=5, help="percent at a gate")
    parser.add_argument("--failed", type=int, default=5, help="percent failed")
    parser.add_argument("--batch", type=int, default=500, help="runs per pipeline")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    os.environ["ORCHESTRATOR_REDIS_URL"] = args.redis_url
    os.environ.pop("ORCHESTRATOR_AUDIT_KEY", None)
    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    server = None
    try:
        templates = make_templates(args.redis_url)
        client.flushdb()
        settings = Settings.from_env()
        before = int(client.info("memory")["used_memory"])
        started = time.perf_counter()
        made = fill(args.redis_url, templates, args.runs, args.waiting, args.failed,
                    args.batch)
        fill_s = time.perf_counter() - started
        # The catalog, as a worker hosting both would publish it (its lease lapses; the
        # entries, which the console reads, stay).
        publish(client, WORKFLOWS, "bench-host", settings=settings)
        used = int(client.info("memory")["used_memory"]) - before
        keys = int(client.dbsize())
        for t in templates:  # a clone sits in Redis exactly where its template run did
            assert footprint(client, t.clones[0]) == t.footprint, (
                t.wf.name, t.kind, footprint(client, t.clones[0]) ^ t.footprint)

        # Callers sign in as in production: ops-lead (operator, group ops) with a token, so
        # /api/v1/gates lists both workflows' gates (BuildAndDeploy's by name, Nightly's by
        # group).
        users = Users(client, settings.key_prefix)
        users.add("ops-lead", "bench-password", groups=["ops"], role="operator")
        token = users.create_token("ops-lead")
        server, base = serve(settings)
        # Pages read the session (the API the token): both, as a signed-in browser and an
        # app would send them.
        cookie, _ = Auth(users, AuthOptions()).open_session(users.get("ops-lead"))
        http = httpx.Client(base_url=base, timeout=60, cookies={SESSION_COOKIE: cookie},
                            headers={"Authorization": f"Bearer {token}"})
        deep_after = args.runs // 2
        page, cursor, walked = None, None, 0
        while walked < deep_after:  # walk to the middle of the list, 500 a page
            page = http.get("/api/v1/runs", params={"limit": 500,
                                                    **({"cursor": cursor} if cursor else {})})
            assert page.status_code == 200, page.text
            cursor = page.json()["next_cursor"]
            walked += len(page.json()["runs"])
        assert cursor, "the list ended before its middle"
        newest = http.get("/api/v1/runs", params={"limit": 1}).json()["runs"][0]["run_id"]
        routes = [
            ("/", {}),
            ("/", {"status": "waiting"}),
            ("/", {"cursor": cursor}),
            ("/runs/" + newest, {}),
            ("/inbox", {}),
            ("/api/v1/runs", {"status": "waiting"}),
            ("/api/v1/runs", {}),
            ("/api/v1/runs", {"cursor": cursor}),
            ("/api/v1/runs", {"workflow": "BuildAndDeploy", "status": "failed"}),
            ("/api/v1/runs", {"prefix": newest[:9]}),
            ("/api/v1/runs/" + newest, {}),
            ("/api/v1/gates", {}),
        ]
        results = [timed(http, path, params, args.requests) for path, params in routes]
        http.close()
        report_ = {"runs": args.runs, "made": made, "fill_seconds": round(fill_s, 1),
                   "redis_used_memory_mb": round(used / 2**20, 1),
                   "bytes_per_run": round(used / args.runs), "keys": keys,
                   "deep_cursor_after": walked, "routes": results}
        if args.json:
            print(json.dumps(report_, indent=2))
        else:
            print(f"{args.runs} runs {made}, filled in {fill_s:.1f} s; Redis "
                  f"{used / 2**20:.1f} MB ({used / args.runs:.0f} B a run), {keys} keys")
            for r in results:
                shown = r["route"] + ("?" + "&".join(
                    f"{k}={v if k != 'cursor' else '<after ' + str(walked) + '>'}"
                    for k, v in r["params"].items()) if r["params"] else "")
                if r.get("missing"):
                    print(f"  {shown:60} not served here (404)")
                else:
                    print(f"  {shown:60} median {r['median_ms']:6.1f} ms  p95 "
                          f"{r['p95_ms']:6.1f} ms  ({r['bytes']} B)")
    finally:
        if server is not None:
            server.should_exit = True
        client.flushdb()
        client.close()


if __name__ == "__main__":
    main()
