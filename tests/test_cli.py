"""Every CLI command through the real entry point, against real Redis and real workers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from typing import Any

import redis

from tests.conftest import ROOT, TEST_ENV, Cluster, wait_for


def cli(redis_url: str, *args: str, check: bool = True, timeout: float = 120,
        **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **TEST_ENV, "ORCHESTRATOR_REDIS_URL": redis_url,
                "PYTHONPATH": str(ROOT), "COLUMNS": "200", **env}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=full_env,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_json(redis_url: str, *args: str) -> Any:
    return json.loads(cli(redis_url, *args, "--json").stdout)


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
    status = cli_json(redis_url, "status", run_id)
    assert status["status"] == "failed" and "not now" in status["error"]["message"]
    assert cli(redis_url, "watch", run_id, check=False).returncode == 1


def test_graph_text_mermaid_and_json(redis_url: str, cluster: Cluster) -> None:
    text = cli(redis_url, "graph", "workers.deploy:build_and_deploy").stdout
    assert "START -> Clone" in text and "Deploy -> Release" in text and "Release -> END" in text
    mermaid = cli(redis_url, "graph", "workers.deploy:build_and_deploy", "--mermaid").stdout
    assert mermaid.startswith("flowchart TD") and 'Build["Build"] --> Bundle["Bundle"]' in mermaid
    assert cli_json(redis_url, "graph", "Loop")["Tick"] == ["Tick", "__end__"]


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
    assert unknown.returncode == 3 and "no worker serves" in unknown.stderr
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
