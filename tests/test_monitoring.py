"""What operators see: Flower listing our step tasks, and logs with run id and step."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from orchestrator import RunStatus, WorkflowRunner
from tests import flows
from tests.conftest import Cluster, Process, free_port, get_json, wait_for
from workers.deploy import build_and_deploy


def test_flower_lists_step_tasks_with_the_run_id(cluster: Cluster) -> None:
    port = free_port()
    env = {**cluster.env, "FLOWER_UNAUTHENTICATED_API": "true"}
    flower = Process("flower", [sys.executable, "-m", "orchestrator.cli", "flower",
                                f"--port={port}", "--address=127.0.0.1"],
                     env, cluster.tmp / "flower.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: get_json(f"{base}/api/workers?refresh=1"), 60, 0.2,
                 what="Flower's API to list workers")
        # Workers start without task events (they cost a publish per task); Flower turns
        # them on when it starts watching.
        wait_for(lambda: all("enabled by remote" in p.log.read_text() for p in cluster.procs),
                 60, 0.2, what="Flower to enable task events on the workers")
        handle = WorkflowRunner(build_and_deploy, app=cluster.app).run({"repo": "acme/app"})
        assert handle.result(timeout=60).status is RunStatus.COMPLETED

        def shown(name: str, run_id: str, query: str = "") -> dict[str, Any] | None:
            tasks = get_json(f"{base}/api/tasks{query}") or {}
            return next((t for t in tasks.values() if t.get("name") == name
                         and run_id in str(t.get("args"))), None)

        task = wait_for(lambda: shown("BuildAndDeploy.Clone", handle.run_id), 60, 0.2,
                        what="Flower to show BuildAndDeploy.Clone")
        assert task["state"] == "SUCCESS"
        assert task["uuid"].startswith(f"{handle.run_id}:")
        names = {t["name"] for t in (get_json(f"{base}/api/tasks") or {}).values()}
        assert {"BuildAndDeploy.START", "BuildAndDeploy.Build", "BuildAndDeploy.branch",
                "BuildAndDeploy.Deploy", "BuildAndDeploy.Release"} <= names

        # A step that raised shows as FAILURE, with its error, and is not retried.
        doomed = WorkflowRunner(flows.doomed, app=cluster.app).run({})
        assert doomed.result(timeout=60).status is RunStatus.FAILED

        task = wait_for(lambda: shown("Doomed.START", doomed.run_id, "?state=FAILURE"), 60,
                        0.2, what="Flower to show Doomed.START failed")
        assert f"doomed {doomed.run_id}" in task["exception"]
        assert task["retries"] == 0
        tries = [t for t in (get_json(f"{base}/api/tasks") or {}).values()
                 if t.get("name") == "Doomed.START" and doomed.run_id in str(t.get("args"))]
        assert len(tries) == 1
    finally:
        flower.terminate()


def _run_and_read_logs(cluster_factory: Callable[..., Cluster], **env: str) -> tuple[str, str]:
    c = cluster_factory(**env)
    c.coordinator("coord")
    w = c.worker("w1")
    handle = WorkflowRunner(build_and_deploy, app=c.app).run({"repo": "acme/app"})
    assert handle.result(timeout=60).status is RunStatus.COMPLETED
    wait_for(lambda: "Release" in w.log.read_text() and "finished" in w.log.read_text(), 30,
             what="the worker's log lines")
    return handle.run_id, w.log.read_text()


def test_text_logs_carry_run_id_and_step(cluster_factory: Callable[..., Cluster]) -> None:
    run_id, log = _run_and_read_logs(cluster_factory)
    lines = [line for line in log.splitlines() if run_id in line]
    assert lines
    for line in lines:
        assert f"run={run_id} step=" in line, line
    assert any(f"run={run_id} step=Clone step started" in line for line in lines)
    assert any(f"run={run_id} step=Build[build_mac] step finished" in line for line in lines)
    received = [line for line in lines if "received" in line and "BuildAndDeploy.Test[" in line]
    assert received and f"run={run_id} step=Test" in received[0]


def test_json_logs_carry_run_id_and_step(cluster_factory: Callable[..., Cluster]) -> None:
    run_id, log = _run_and_read_logs(cluster_factory, ORCHESTRATOR_LOG_FORMAT="json")
    entries = []
    for line in log.splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    mine = [e for e in entries if e["run_id"] == run_id]
    steps = {e["step"] for e in mine}
    assert {"Clone", "Test", "Deploy", "Release", "Build[build_linux]"} <= steps
    assert all(e["step"] != "-" for e in mine)
    assert not [line for line in log.splitlines() if run_id in line and not line.startswith("{")]

