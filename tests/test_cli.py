"""Every CLI command through the real entry point, against real Redis and real workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from orchestrator._stores import RedisStore
from tests.conftest import ROOT, TEST_ENV, Cluster, free_port, wait_for


def cli(redis_url: str, *args: str, check: bool = True, timeout: float = 120,
        **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **TEST_ENV, "ORCHESTRATOR_REDIS_URL": redis_url,
                "PYTHONPATH": str(ROOT), "COLUMNS": "200", **env}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=full_env,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_json(redis_url: str, *args: str, code: int = 0) -> Any:
    """The command's JSON; `code` is the exit it must give (1: the run failed)."""
    proc = cli(redis_url, *args, "--json", check=False)
    assert proc.returncode == code, f"{args} exited {proc.returncode}:\n{proc.stderr}"
    return json.loads(proc.stdout)


START_BY_NAME = textwrap.dedent("""
    import json, sys
    from orchestrator._client import Client
    handle = Client().start("BuildAndDeploy", {"repo": "acme/app", "environment": "production"})
    assert not any(m.startswith("workers") for m in sys.modules), "imported workflow code"
    print(handle.run_id)
""")


def test_start_by_name_approve_from_cli_read_status_json(cluster: Cluster,
                                                         redis_url: str) -> None:
    env = {**os.environ, "ORCHESTRATOR_REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
    run_id = subprocess.run([sys.executable, "-c", START_BY_NAME], env=env, cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.strip()
    wait_for(lambda: cli_json(redis_url, "gates", "--approver", "ops-lead"), 60,
             what="the gate to be listed")
    gates = cli_json(redis_url, "gates", "--approver", "ops-lead")
    assert [g["run_id"] for g in gates] == [run_id] and gates[0]["step"] == "Deploy"
    assert cli_json(redis_url, "gates", "--approver", "intern") == []

    denied = cli(redis_url, "approve", run_id, "--as", "intern", check=False)
    assert denied.returncode == 4 and "intern" in denied.stderr
    assert len(denied.stderr.strip().splitlines()) == 1

    approved = cli_json(redis_url, "approve", run_id, "--as", "ops-lead", "--comment", "go")
    assert approved["run_id"] == run_id
    assert cli(redis_url, "watch", run_id, "--timeout", "60").returncode == 0
    status = cli_json(redis_url, "status", run_id)
    assert status["status"] == "completed"
    assert status["state"]["released"] is True
    assert status["step_results"]["Deploy"]["by"] == "ops-lead"
    assert status["step_results"]["Deploy"]["comment"] == "go"
    assert any(e["event"] == "gate_approved" for e in status["history"])


def test_workflows_catalog(cluster: Cluster, redis_url: str) -> None:
    catalog = {e["name"]: e for e in cli_json(redis_url, "workflows")}
    entry = catalog["BuildAndDeploy"]
    assert entry["description"] == "Build, test, deploy"
    assert entry["input_schema"]["required"] == ["repo"]
    assert "artifact" in entry["state_schema"]["properties"]
    assert entry["graph"]["Deploy"] == ["Release"] and entry["graph"]["Build"] == ["Bundle"]
    assert entry["queues"]["Clone"] == "orchestrator.steps"
    assert {"w1@" in h or "w2@" in h or "coord@" in h for h in entry["hosts"]} == {True}
    assert not any("%" in h for h in entry["hosts"])  # w1@%h as Celery expands it
    table = cli(redis_url, "workflows").stdout
    assert "BuildAndDeploy" in table and "Loop" in table


def test_run_remote_by_name_and_runs_listing(cluster: Cluster, redis_url: str) -> None:
    result = cli_json(redis_url, "run", "Branching", "--remote", "--input", '{"value": 20}',
                      "--timeout", "60")
    assert result["status"] == "completed" and result["output"] == "big"
    queued = cli_json(redis_url, "run", "Branching", "--remote", "--no-wait", "--input",
                      '{"value": 1}')
    wait_for(lambda: cli_json(redis_url, "status", queued["run_id"])["status"] == "completed",
             60, what="the queued run")
    listed = cli_json(redis_url, "runs", "--workflow", "Branching", "--status", "completed")
    assert {r["run_id"] for r in listed} == {result["run_id"], queued["run_id"]}
    assert cli_json(redis_url, "runs", "--status", "failed") == []
    assert queued["run_id"] in cli(redis_url, "runs").stdout


def test_pause_resume_stop_from_cli(cluster: Cluster, redis_url: str,
                                    rclient: redis.Redis) -> None:
    first = cli_json(redis_url, "run", "ThreeSteps", "--remote", "--no-wait")["run_id"]
    wait_for(lambda: rclient.llen(f"t:{first}:events") >= 1, 60, what="A to start")
    assert cli_json(redis_url, "pause", first)["status"] == "paused"
    rclient.set(f"t:{first}:release", 1)
    wait_for(lambda: cli_json(redis_url, "status", first)["task"]["step"] == "B", 60,
             what="A's completion")
    assert cli_json(redis_url, "status", first)["task"]["dispatched_at"] is None
    assert cli_json(redis_url, "resume", first)["status"] in ("running", "completed")
    wait_for(lambda: cli_json(redis_url, "status", first)["status"] == "completed", 60,
             what="the resumed run to finish")

    second = cli_json(redis_url, "run", "ThreeSteps", "--remote", "--no-wait")["run_id"]
    wait_for(lambda: rclient.llen(f"t:{second}:events") >= 1, 60, what="A to start")
    assert cli_json(redis_url, "stop", second)["status"] == "stopped"
    again = cli(redis_url, "resume", second, check=False)
    assert again.returncode == 2 and "stopped" in again.stderr


def test_reject_from_cli(cluster: Cluster, redis_url: str) -> None:
    run_id = cli_json(redis_url, "run", "Gated", "--remote", "--no-wait")["run_id"]
    wait_for(lambda: cli_json(redis_url, "status", run_id)["status"] == "waiting", 60,
             what="the gate")
    cli(redis_url, "reject", run_id, "--as", "ops-lead", "--reason", "not now")
    status = cli_json(redis_url, "status", run_id, code=1)
    assert status["status"] == "failed" and "not now" in status["error"]["message"]
    assert cli(redis_url, "watch", run_id, check=False).returncode == 1


def test_graph_text_mermaid_and_json(redis_url: str, cluster: Cluster) -> None:
    text = cli(redis_url, "graph", "workers.deploy:build_and_deploy").stdout.splitlines()
    assert text == ["START -> Clone", "Clone -> Build",
                    "Build =fork=> [build_linux, build_mac, build_win] -> Bundle",
                    "Bundle -> Test", "Test -> Deploy", "Deploy ?gate? -> Release",
                    "Release -> END"]
    mermaid = cli(redis_url, "graph", "workers.deploy:build_and_deploy", "--mermaid").stdout
    assert mermaid.startswith("flowchart TD")
    assert 'Build["Build"] -->|fork| Build__build_mac[["build_mac"]]' in mermaid
    assert 'Build__build_mac[["build_mac"]] --> Bundle["Bundle"]' in mermaid
    assert 'Test["Test"] --> Deploy{{"Deploy ?gate?"}}' in mermaid
    assert 'Deploy{{"Deploy ?gate?"}} --> Release["Release"]' in mermaid
    shape = cli_json(redis_url, "graph", "workers.deploy:build_and_deploy")
    assert shape["Deploy"] == {"next": ["Release"], "fork": [], "gate": True}
    assert cli_json(redis_url, "graph", "Loop")["Tick"]["next"] == ["Tick", "__end__"]
    # By catalog name too: the catalog publishes forks and gates.
    published = cli(redis_url, "graph", "BuildAndDeploy").stdout.splitlines()
    assert published == text


def test_embedded_run_with_approve_as(redis_url: str) -> None:
    proc = cli(redis_url, "run", "workers.deploy:build_and_deploy", "--input",
               '{"repo": "acme/app", "environment": "production"}', "--approve-as", "ops-lead")
    assert "gate_opened" in proc.stdout and "gate_approved" in proc.stdout
    assert "completed" in proc.stdout


def test_embedded_run_at_a_gate_without_approver_exits_7(redis_url: str) -> None:
    proc = cli(redis_url, "run", "workers.deploy:build_and_deploy", "--input",
               '{"repo": "acme/app", "environment": "production"}', check=False)
    assert proc.returncode == 7 and "--approve-as" in proc.stderr


def test_embedded_run_asks_on_the_terminal(redis_url: str, tmp_path: Any) -> None:
    # A real pseudo-terminal, so the command sees an interactive user and prompts.
    import pty
    import select

    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORCHESTRATOR_REDIS_URL": redis_url}
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", "workers.deploy:build_and_deploy",
         "--input", '{"repo": "acme/app", "environment": "production"}'],
        stdin=child_fd, stdout=child_fd, stderr=child_fd, env=env, cwd=ROOT)
    os.close(child_fd)
    seen = b""

    def pump() -> None:
        nonlocal seen
        try:
            while select.select([main_fd], [], [], 0.05)[0]:
                chunk = os.read(main_fd, 4096)
                if not chunk:
                    return
                seen += chunk
        except OSError:  # the command exited and closed its terminal
            return

    def read_until(marker: bytes) -> bool:
        pump()
        return marker in seen

    wait_for(lambda: read_until(b"approve or reject"), 60, what="the prompt")
    os.write(main_fd, b"reject\n")
    wait_for(lambda: read_until(b"as"), 10, what="who")
    # Someone who may not decide is asked again: refusing would end the embedded run.
    os.write(main_fd, b"intern\n")
    wait_for(lambda: read_until(b"not an approver"), 10, what="the refusal")
    seen = seen[seen.index(b"not an approver"):]
    wait_for(lambda: read_until(b"as"), 10, what="who, again")
    assert proc.poll() is None
    os.write(main_fd, b"ops-lead\n")
    wait_for(lambda: read_until(b"comment"), 10, what="comment")
    os.write(main_fd, b"not today\n")
    wait_for(lambda: read_until(b"failed") and proc.poll() is not None, 60, what="the end")
    pump()
    assert proc.returncode == 1
    assert b"gate_rejected" in seen and b"not today" in seen
    os.close(main_fd)


def test_clear_errors_and_exit_codes(cluster: Cluster, redis_url: str) -> None:
    missing = cli(redis_url, "status", "no-such-run", check=False)
    assert missing.returncode == 3 and "no-such-run" in missing.stderr
    unknown = cli(redis_url, "run", "NoSuchFlow", "--remote", check=False)
    assert unknown.returncode == 3 and "NoSuchFlow" in unknown.stderr
    bad = cli(redis_url, "run", "BuildAndDeploy", "--remote", "--input", '{"repo": 5}',
              check=False)
    assert bad.returncode == 2 and "repo" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    not_json = cli(redis_url, "run", "BuildAndDeploy", "--remote", "--input", "{", check=False)
    assert not_json.returncode == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = cli(f"redis://127.0.0.1:{port}/0", "runs", check=False, timeout=60)
    assert down.returncode == 5 and f"127.0.0.1:{port}" in down.stderr


def test_ids_are_whole_in_80_columns_and_piped(cluster: Cluster, redis_url: str) -> None:
    run_id = cli_json(redis_url, "run", "Gated", "--remote", "--no-wait")["run_id"]
    wait_for(lambda: cli_json(redis_url, "gates"), 60, what="the gate")
    for command in ("runs", "gates"):
        listing = cli(redis_url, command, COLUMNS="80").stdout  # captured: a pipe
        assert run_id in listing, listing
        assert max(map(len, listing.splitlines())) <= 80


def test_a_unique_prefix_names_a_run(cluster: Cluster, redis_url: str) -> None:
    for suffix in ("first", "second"):
        cli(redis_url, "run", "Gated", "--remote", "--no-wait", "--run-id", f"abc-{suffix}")
    wait_for(lambda: len(cli_json(redis_url, "gates")) == 2, 60, what="both gates")
    assert cli_json(redis_url, "status", "abc-f")["run_id"] == "abc-first"
    assert cli_json(redis_url, "reject", "abc-s", "--as", "ops-lead")["run_id"] == "abc-second"
    ambiguous = cli(redis_url, "status", "abc", check=False)
    assert ambiguous.returncode == 2
    assert "abc-first" in ambiguous.stderr and "abc-second" in ambiguous.stderr
    assert cli(redis_url, "pause", "abd", check=False).returncode == 3


def test_user_text_is_printed_as_text(cluster: Cluster, redis_url: str) -> None:
    run_id = cli_json(redis_url, "run", "Gated", "--remote", "--no-wait")["run_id"]
    wait_for(lambda: cli_json(redis_url, "gates"), 60, what="the gate")
    cli(redis_url, "reject", run_id, "--as", "ops-lead", "--reason",
        "[red]x[/red] \x1b[2J\rgone")
    shown = cli(redis_url, "status", run_id, check=False)
    assert shown.returncode == 1
    assert "\x1b" not in shown.stdout and "\r" not in shown.stdout
    reason = next(line for line in shown.stdout.splitlines() if "gate_rejected" in line)
    assert "[red]x[/red] \\x1b[2J\\rgone" in reason
    error = next(line for line in shown.stdout.splitlines() if "GateRejected" in line)
    assert "[red]x[/red]" in error


def test_status_says_queued_until_a_worker_takes_the_step(cluster: Cluster, redis_url: str,
                                                          rclient: redis.Redis) -> None:
    # Two single-process workers, each held by a ThreeSteps run's first step.
    held = [cli_json(redis_url, "run", "ThreeSteps", "--remote", "--no-wait")["run_id"]
            for _ in range(2)]
    for run_id in held:
        wait_for(lambda run_id=run_id: rclient.llen(f"t:{run_id}:events"), 60,
                 what="a worker to take the step")
    waiting = cli_json(redis_url, "run", "ThreeSteps", "--remote", "--no-wait")["run_id"]
    assert f"{waiting}: queued at A" in cli(redis_url, "status", waiting).stdout
    assert cli_json(redis_url, "status", waiting)["status"] == "running"  # to the engine
    assert f"{held[0]}: running at A" in cli(redis_url, "status", held[0]).stdout
    for run_id in [*held, waiting]:
        rclient.set(f"t:{run_id}:release", 1)


def test_run_finds_a_module_in_the_current_directory(redis_url: str, tmp_path: Any) -> None:
    (tmp_path / "mymodule.py").write_text(textwrap.dedent("""
        from orchestrator import END, START, Next, Workflow
        flow = Workflow("Mine").flow({START: "Go", "Go": lambda ctx: Next(END, output=7)})
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORCHESTRATOR_REDIS_URL": redis_url}
    # -P: sys.path gets no current directory, as under the `orchestrator` console script.
    proc = subprocess.run([sys.executable, "-P", "-m", "orchestrator.cli", "run",
                           "mymodule:flow", "--json"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["output"] == 7


def test_worker_says_which_setting_names_a_missing_module(redis_url: str) -> None:
    proc = cli(redis_url, "worker", check=False, ORCHESTRATOR_WORKFLOWS="no_such_flows_here")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "ORCHESTRATOR_WORKFLOWS" in proc.stderr and "PYTHONPATH" in proc.stderr
    assert "no_such_flows_here" in proc.stderr


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc has them) with a socket listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_flower_listens_on_loopback_only_by_default(redis_url: str, tmp_path: Any) -> None:
    port = free_port()
    env = {**os.environ, **TEST_ENV, "ORCHESTRATOR_REDIS_URL": redis_url,
           "PYTHONPATH": str(ROOT)}
    log = tmp_path / "flower.log"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "flower", "--port",
                             str(port)], env=env, cwd=ROOT, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: _listening(port) or proc.poll() is not None, 60, 0.1,
                 what="Flower to listen")
        assert _listening(port) == {"0100007F"}, log.read_text()  # 127.0.0.1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _catalog_without_live_workers(cluster_factory: Callable[..., Cluster]) -> None:
    """The catalog of tests.flows, published by a worker that has left again."""
    cluster = cluster_factory()
    cluster.worker("gone")
    cluster.stop()  # a clean shutdown withdraws the host; the entries stay


def test_queue_anyway_enqueues_for_no_live_worker_and_status_says_queued(
        cluster_factory: Callable[..., Cluster], redis_url: str) -> None:
    _catalog_without_live_workers(cluster_factory)
    refused = cli(redis_url, "run", "Branching", "--remote", "--input", '{"value": 1}',
                  check=False)
    assert refused.returncode == 3 and "queue" in refused.stderr
    run_id = cli_json(redis_url, "run", "Branching", "--remote", "--queue-anyway", "--no-wait",
                      "--input", '{"value": 1}')["run_id"]
    shown = cli(redis_url, "status", run_id).stdout
    assert f"{run_id}: queued (no worker hosts Branching@" in shown and "at Check" in shown


def test_a_corrupt_run_is_listed_and_its_fields_readable(
        cluster_factory: Callable[..., Cluster], redis_url: str,
        rclient: redis.Redis) -> None:
    _catalog_without_live_workers(cluster_factory)
    run_id = cli_json(redis_url, "run", "Branching", "--remote", "--queue-anyway", "--no-wait",
                      "--input", '{"value": 1}')["run_id"]
    store = RedisStore(redis_url, "orchestrator:")
    rclient.hset(f"orchestrator:run:{{{run_id}}}", "doc", "{torn")
    store.quarantine(run_id)
    store.close()
    assert [r for r in cli_json(redis_url, "runs") if r["run_id"] == run_id] == [
        {"run_id": run_id, "status": "corrupt"}]
    assert run_id in cli(redis_url, "runs", COLUMNS="80").stdout
    shown = cli(redis_url, "status", run_id, check=False)
    assert shown.returncode == 1 and "--raw" in shown.stderr and "Traceback" not in shown.stderr
    raw = json.loads(cli(redis_url, "status", run_id[:10], "--raw").stdout)
    assert raw["run_id"] == run_id and raw["fields"]["doc"] == "{torn"


def test_watch_and_status_follow_a_trimmed_history_by_number(
        cluster_factory: Callable[..., Cluster], redis_url: str) -> None:
    _catalog_without_live_workers(cluster_factory)
    from orchestrator import WorkflowRunner, local_runtime
    from tests.flows import loop

    store = RedisStore(redis_url, "loop:", history_limit=3)
    runtime = local_runtime(store)
    try:
        handle = WorkflowRunner(loop, runtime=runtime).run({"times": 30})
        handle.result(timeout=60)
    finally:
        runtime.close()
    entries = handle.history()
    assert entries[3]["event"] == "history_trimmed"  # first 3, the marker, last 3
    names = {e["event"] for e in entries}
    for command in ("status", "watch"):
        out = cli(redis_url, command, handle.run_id).stdout
        # History lines are indented: "  ✓ step_completed Tick ..."
        words = [line.split() for line in out.splitlines() if line.startswith("  ")]
        shown = [w[1] for w in words if len(w) > 1 and w[1] in names]
        assert shown == [e["event"] for e in entries], (command, shown)
