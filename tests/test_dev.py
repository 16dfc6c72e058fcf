"""docker-compose.yml checked against the real CLI (no engine runs here), and
`orchestrator dev` starting the same topology as local processes."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys

import click
import pytest
import yaml

from orchestrator import Settings
from orchestrator.cli import cli
from tests.conftest import ROOT, answers, free_port, get_json, wait_for

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = ["coordinator", "worker", "flower", "example"]


def test_compose_has_the_topology() -> None:
    assert set(SERVICES) == {"redis", *APP_SERVICES}
    redis = SERVICES["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(v.endswith(":/data") for v in redis["volumes"])
    worker = SERVICES["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=4
    assert "5555:5555" in SERVICES["flower"]["ports"]
    assert SERVICES["example"]["restart"] != "always"
    for name in APP_SERVICES:
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_compose_commands_parse_with_the_real_cli(service: str) -> None:
    argv = SERVICES[service]["command"]
    argv = shlex.split(argv) if isinstance(argv, str) else list(argv)
    assert argv[0] == "orchestrator"
    name = argv[1]
    assert name == {"coordinator": "coordinator", "worker": "worker", "flower": "flower",
                    "example": "run"}[service]
    command = cli.commands[name]
    assert isinstance(command, click.Command)
    command.make_context(name, argv[2:])  # raises on an unknown option or a missing argument


def test_compose_env_names_real_settings() -> None:
    fields = {f"ORCHESTRATOR_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    for name in APP_SERVICES:
        env = SERVICES[name]["environment"]
        used = {k for k in env if k.startswith("ORCHESTRATOR_")}
        assert used and used <= fields, (name, used - fields)
        assert env["ORCHESTRATOR_REDIS_URL"].startswith("redis://redis:")


def test_dockerfile_runs_an_orchestrator_command() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = next(line for line in dockerfile.splitlines() if line.startswith("CMD"))
    argv = json.loads(cmd.removeprefix("CMD").strip())
    assert argv[0] == "orchestrator" and argv[1] in cli.commands
    assert "pip install" in dockerfile


def _dev(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "dev", *args]


def test_dev_starts_the_topology_and_runs_the_example() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORCHESTRATOR_WORKFLOWS": "workers"}
    proc = subprocess.run(_dev("--workers", "2", "--no-flower", "--redis-port", str(port),
                               "--exit-after-example"),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for name in ("redis |", "coordinator |", "worker.1 |", "worker.2 |", "example |"):
        assert name in out, name
    assert "ready: coordinator and 2 worker(s)" in out
    assert "completed" in out and "example finished with exit code 0" in out
    assert not answers(port)  # its redis-server stopped with it


def test_dev_with_flower_stops_everything_on_sigterm() -> None:
    port, flower_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORCHESTRATOR_WORKFLOWS": "workers"}
    proc = subprocess.Popen(_dev("--workers", "1", "--redis-port", str(port), "--flower-port",
                                 str(flower_port), "--no-example"),
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        workers = wait_for(lambda: get_json(f"http://127.0.0.1:{flower_port}/api/workers"), 120,
                           0.2, what="Flower's API")
        assert any(name.startswith("worker1@") for name in workers)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not answers(flower_port) and not answers(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
