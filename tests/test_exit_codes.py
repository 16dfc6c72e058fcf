"""Every exit code of the CLI, each from a real command (and the one table they come from)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import redis

from orchestrator import _stores
from orchestrator._client import AmbiguousRunId, InvalidInput, NoLiveWorker
from orchestrator._engine import ControlError
from orchestrator._runtime import RunNotFound
from orchestrator.cli import AtGate, RunEnded, exit_code
from tests.conftest import ROOT, TEST_ENV, Cluster, free_port, wait_for
from tests.test_cli import cli, cli_json


@pytest.mark.parametrize(("exc", "code"), [
    (RunEnded(), 1),
    (ValueError("bad"), 2), (InvalidInput("bad"), 2), (ControlError("no gate"), 2),
    (AmbiguousRunId("ab"), 2), (json.JSONDecodeError("x", "{", 1), 2),
    (RunNotFound("x"), 3), (NoLiveWorker("x"), 3),
    (PermissionError("intern"), 4),
    (_stores.StoreUnavailable("down"), 5), (ConnectionRefusedError(), 5), (OSError(), 5),
    (redis.ConnectionError(), 5),
    (TimeoutError("slow"), 6),
    (AtGate("at Deploy"), 7),
])
def test_one_table_most_specific_first(exc: BaseException, code: int) -> None:
    # TimeoutError and PermissionError are OSErrors: listed after OSError they became 5.
    assert exit_code(exc) == code


def test_an_unexpected_error_is_not_given_a_code() -> None:
    assert exit_code(KeyError("bug")) is None


def test_0_and_2_and_3_without_a_cluster(redis_url: str) -> None:
    assert cli(redis_url, "runs").returncode == 0
    assert cli_json(redis_url, "recover") == {"recovered": 0}
    missing = cli(redis_url, "status", "no-such-run", check=False)
    assert missing.returncode == 3 and "no-such-run" in missing.stderr
    usage = cli(redis_url, "status", check=False)
    assert usage.returncode == 2
    for bad in ("{", "[1]", "{" * 1000 + "}" * 1000,
                '{"value": 1, "deep": ' + "[" * 1000 + "]" * 1000 + "}"):
        proc = cli(redis_url, "run", "tests.flows:branching", "--input", bad, check=False)
        assert proc.returncode == 2, (bad[:20], proc.stderr)
        assert "--input" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert "Traceback" not in proc.stderr


def test_5_redis_unreachable() -> None:
    down = cli(f"redis://127.0.0.1:{free_port()}/0", "runs", check=False, timeout=60)
    assert down.returncode == 5 and "cannot reach Redis" in down.stderr


def test_7_embedded_run_at_a_gate_nobody_here_may_decide(redis_url: str) -> None:
    proc = cli(redis_url, "run", "tests.flows:gated", check=False)
    assert proc.returncode == 7 and "--approve-as" in proc.stderr


def test_1_4_6_and_the_status_rule_on_a_cluster(cluster: Cluster, redis_url: str) -> None:
    run_id = cli_json(redis_url, "run", "Gated", "--remote", "--no-wait")["run_id"]
    wait_for(lambda: cli_json(redis_url, "status", run_id)["status"] == "waiting", 60,
             what="the gate")
    # 6: waiting on a gated run that nobody decides times out, in either command.
    for args in (["watch", run_id, "--timeout", "3"],
                 ["run", "Gated", "--remote", "--timeout", "3"]):
        timed_out = cli(redis_url, *args, check=False)
        assert timed_out.returncode == 6, (args, timed_out.stderr)
        assert "timed out" in timed_out.stderr
    # 0 while the run waits: parked is not failed.
    assert cli(redis_url, "status", run_id).returncode == 0
    # 4: not an approver.
    denied = cli(redis_url, "reject", run_id, "--as", "intern", check=False)
    assert denied.returncode == 4 and "intern" in denied.stderr
    # 1: the run failed, and run, watch and status all say so the same way.
    cli(redis_url, "reject", run_id, "--as", "ops-lead", "--reason", "no")
    assert cli(redis_url, "status", run_id, check=False).returncode == 1
    assert cli(redis_url, "status", run_id, "--json", check=False).returncode == 1
    assert cli(redis_url, "watch", run_id, check=False).returncode == 1
    watched = cli(redis_url, "watch", run_id, "--json", check=False)
    assert watched.returncode == 1 and json.loads(watched.stdout)["status"] == "failed"
    stopped = cli_json(redis_url, "run", "Gated", "--remote", "--no-wait")["run_id"]
    cli(redis_url, "stop", stopped)
    assert cli(redis_url, "status", stopped, check=False).returncode == 1


def test_1_from_run_for_a_failed_run(redis_url: str) -> None:
    failed = cli(redis_url, "run", "tests.flows:bad_transition", check=False)
    assert failed.returncode == 1 and "failed" in failed.stdout


def test_6_embedded_run_exits_at_once_while_its_step_still_runs(redis_url: str,
                                                                rclient: redis.Redis) -> None:
    env = {**os.environ, **TEST_ENV, "ORCHESTRATOR_REDIS_URL": redis_url,
           "PYTHONPATH": str(ROOT)}
    # ThreeSteps' first step waits (up to 120 s) for a key this test never sets.
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run",
                             "tests.flows:three_steps", "--timeout", "1"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None, 60, 0.1, what="the command to exit")
        out, errors = proc.communicate()
        # The step still waits for its key: it has recorded nothing past its start.
        run_id = out.split()[2]  # "ThreeSteps run <id>"
        assert "finished" not in {json.loads(e)["what"]
                                  for e in rclient.lrange(f"t:{run_id}:events", 0, -1)}
        assert proc.returncode == 6, errors
        assert "timed out" in errors and "cannot schedule new futures" not in errors
        assert "Traceback" not in errors
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
