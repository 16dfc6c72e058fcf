"""docker-compose.yml checked against the real CLI (no engine runs here), and
`orchestrator dev` starting the same topology as local processes."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import redis
import yaml
from celery.bin.worker import worker as celery_worker
from flower.options import options as flower_options
from rich.console import Console

from orchestrator import Settings, _dev
from orchestrator.cli import cli
from tests.conftest import ROOT, Cluster, answers, free_port, get_json, wait_for

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
APP_SERVICES = ["coordinator", "worker", "flower", "example"]
SUBCOMMAND = {"coordinator": "coordinator", "worker": "worker", "flower": "flower",
              "example": "run"}
SETTINGS_ENV = {f"ORCHESTRATOR_{f.name.upper()}" for f in dataclasses.fields(Settings)}
CELERY_WORKER_OPTS = {o for p in celery_worker.params for o in (*p.opts, *p.secondary_opts)}


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def _parse(argv: list[str]) -> tuple[str, click.Context]:
    """`orchestrator ...` through the real group and subcommand parsers (nothing runs)."""
    assert argv[0] == "orchestrator" and not argv[1].startswith("-"), argv
    group = cli.make_context("orchestrator", argv[1:])
    name, command, rest = cli.resolve_command(group, argv[1:])
    assert name is not None and command is not None, argv
    return name, command.make_context(name, rest, parent=group)


def _pass_through_is_known(name: str, args: tuple[str, ...]) -> bool:
    """Whatever the CLI hands on to Celery or Flower is an option they accept."""
    opts = [a.split("=")[0] for a in args if a.startswith("-")]
    if name == "flower":
        return all(o.lstrip("-").replace("_", "-") in flower_options._options for o in opts)
    return all(o in CELERY_WORKER_OPTS for o in opts)


# ---- docker-compose.yml ---------------------------------------------------------------


def test_compose_has_the_topology() -> None:
    assert set(SERVICES) == {"redis", *APP_SERVICES}
    redis = SERVICES["redis"]
    assert redis["image"].startswith("redis:7")
    command = _argv(redis["command"])
    assert command[command.index("--appendonly") + 1] == "yes"
    volume = next(v for v in redis["volumes"] if v.endswith(":/data"))
    assert volume.split(":")[0] in COMPOSE["volumes"]  # a named volume, declared
    assert _argv(redis["healthcheck"]["test"])[-2:] == ["redis-cli", "ping"]
    flower = SERVICES["flower"]
    # Published on the host's loopback only, password always asked; inside the container
    # it must listen on every interface for Docker to forward to it.
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert "FLOWER_UNAUTHENTICATED_API" not in flower["environment"]
    _, ctx = _parse(_argv(flower["command"]))
    assert ctx.params["address"] == "0.0.0.0"


def test_compose_worker_scales() -> None:
    worker = SERVICES["worker"]
    # Each of these would make `--scale worker=4` fail or make the replicas collide.
    assert not {"container_name", "ports", "hostname"} & set(worker)
    _, ctx = _parse(_argv(worker["command"]))
    assert "%h" in ctx.params["hostname"]  # one Celery node name per container


def test_compose_app_services_share_config_and_wait_for_healthy_redis() -> None:
    for name in APP_SERVICES:
        service = SERVICES[name]
        assert service["build"] == "." and service["image"] == SERVICES["worker"]["image"]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_compose_example_is_a_one_shot_after_the_cluster_is_up() -> None:
    example = SERVICES["example"]
    assert example["restart"] == "no"  # the string: a bare `no` would be YAML's False
    for dependency in ("coordinator", "worker"):
        assert example["depends_on"][dependency]["condition"] == "service_healthy"
    name, ctx = _parse(_argv(example["command"]))
    assert name == "run" and ctx.params["target"] == "BuildAndDeploy"
    assert ctx.params["remote"] and json.loads(ctx.params["input_json"]) == {"repo": "acme/app"}


@pytest.mark.parametrize("service", APP_SERVICES)
def test_compose_commands_parse_with_the_real_cli(service: str) -> None:
    name, ctx = _parse(_argv(SERVICES[service]["command"]))
    assert name == SUBCOMMAND[service]
    passed_on = ctx.params.get("celery_args", ()) or ctx.params.get("flower_args", ())
    assert _pass_through_is_known(name, passed_on), passed_on


def test_pass_through_check_catches_a_typo() -> None:
    _, ctx = _parse(["orchestrator", "worker", "--concurency", "2"])
    assert ctx.params["celery_args"] == ("--concurency", "2")  # the CLI itself lets it by
    assert not _pass_through_is_known("worker", ctx.params["celery_args"])
    with pytest.raises(click.UsageError):
        _parse(["orchestrator", "run", "BuildAndDeploy", "--remotely"])
    with pytest.raises(click.UsageError):
        _parse(["orchestrator", "wroker"])


def test_compose_env_names_real_settings() -> None:
    for name in APP_SERVICES:
        env = SERVICES[name]["environment"]
        used = {k for k in env if k.startswith("ORCHESTRATOR_")}
        assert used and used <= SETTINGS_ENV, (name, used - SETTINGS_ENV)
        assert env["ORCHESTRATOR_REDIS_URL"] == "redis://redis:6379/0"
        assert env["ORCHESTRATOR_WORKFLOWS"] == "workers"
        # The values must parse, too: Settings is what every process builds from them.
        assert Settings.from_env(env).redis_url == "redis://redis:6379/0"


@pytest.mark.parametrize("service", ["coordinator", "worker"])
def test_compose_healthchecks_ping_the_node_the_command_names(service: str,
                                                              cluster_factory: Any) -> None:
    """Run the healthcheck as the container would: fails before the node is up, then passes."""
    _, ctx = _parse(_argv(SERVICES[service]["command"]))
    node = ctx.params["hostname"].split("@")[0]
    kind, check = _argv(SERVICES[service]["healthcheck"]["test"])
    assert kind == "CMD-SHELL"
    cluster: Cluster = cluster_factory()
    env = {**cluster.env, "HOSTNAME": socket.gethostname(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    shell = check.replace("$$", "$")  # compose's escape for a literal $
    probe = ["sh", "-c", shell.replace("-t 5", "-t 1")]

    def healthy() -> bool:
        return subprocess.run(probe, env=env, capture_output=True, timeout=60).returncode == 0

    assert not healthy()
    getattr(cluster, service)(node)  # node@%h, the name the compose command gives
    assert wait_for(healthy, 30, 0.5, what=f"{service}'s healthcheck")


# ---- Dockerfile --------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [(w.upper(), rest.strip()) for w, _, rest in
            (line.partition(" ") for line in lines if line and not line.startswith("#"))]


def _exec_form(value: str) -> list[str]:
    return json.loads(value) if value.startswith("[") else shlex.split(value)


def test_dockerfile_runs_an_orchestrator_command() -> None:
    instructions = _dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    entry = [_exec_form(v) for k, v in instructions if k == "ENTRYPOINT"]
    cmd = [_exec_form(v) for k, v in instructions if k == "CMD"]
    argv = [*(entry[-1] if entry else []), *(cmd[-1] if cmd else [])]
    assert argv, "no CMD or ENTRYPOINT"
    name, _ = _parse(argv)
    assert name == "worker"
    assert any(re.search(r"\bpip install\b.*\s\.(\s|$)", v) for k, v in instructions
               if k == "RUN")  # the project itself, from the copied sources


def test_dockerfile_copies_what_the_install_needs_and_sets_real_settings() -> None:
    instructions = _dockerfile()
    copied = {src for k, v in instructions if k == "COPY" for src in shlex.split(v)[:-1]}
    assert {"pyproject.toml", "README.md", "orchestrator", "workers"} <= copied
    assert all((ROOT / src).exists() for src in copied), copied
    env = [pair.split("=")[0] for k, v in instructions if k == "ENV" for pair in v.split()]
    assert {e for e in env if e.startswith("ORCHESTRATOR_")} <= SETTINGS_ENV


# ---- orchestrator dev: pieces ---------------------------------------------------------


def test_child_env_hands_every_setting_to_the_children() -> None:
    settings = Settings(redis_url="redis://elsewhere:1/0", broker_url="amqp://x//",
                        workflows=("workers", "tests.flows"), lease_ttl=2.5, sweep_batch=7,
                        task_events=True, log_format="json")
    env = _dev.child_env(settings, "redis://127.0.0.1:7000/0")
    assert Settings.from_env(env) == dataclasses.replace(
        settings, redis_url="redis://127.0.0.1:7000/0", broker_url=None)


def test_child_output_is_relayed_verbatim_and_readiness_noticed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr(_dev, "console", Console(file=buffer, width=200, soft_wrap=True))
    lines = ["[tasks]", "  . see [/tmp/x] and [bold]", "w1@host ready."]
    topology = _dev.Topology(dict(os.environ))
    child = topology.start("w1", [sys.executable, "-c", f"print({chr(10).join(lines)!r})"])
    assert child.ready.wait(30)
    topology.stop()
    assert buffer.getvalue().splitlines() == [f"{'w1':>12} | {line}" for line in lines]


# ---- orchestrator dev: end to end -----------------------------------------------------


def _dev_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "dev", *args]


def _dev_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    return {**env, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


def _lines_of(out: str, name: str) -> list[str]:
    prefix = re.compile(rf"^\s*{re.escape(name)} \| ?")
    return [prefix.sub("", line) for line in out.splitlines() if prefix.match(line)]


def _leftovers(port: int) -> list[int]:
    """Processes pointed at this Redis port (by environment) or serving it (by command line)."""
    mark = re.compile(rb"127\.0\.0\.1:%d(?!\d)|--port\0%d\0" % (port, port))
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if mark.search(blob):
            found.append(int(entry.name))
    return found


def _none_left(port: int) -> None:
    wait_for(lambda: not _leftovers(port) and not answers(port), 10, 0.1,
             what=f"every process of the dev topology on port {port} to be gone")


def test_dev_starts_the_topology_and_runs_the_example() -> None:
    port = free_port()
    assert not answers(port)
    proc = subprocess.run(_dev_argv("--workers", "2", "--no-flower", "--redis-port", str(port),
                                    "--exit-after-example"),
                          env=_dev_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert _lines_of(out, "redis")  # dev started its own redis-server
    for name in ("coordinator", "worker.1", "worker.2"):
        assert any("ready." in line for line in _lines_of(out, name)), name
    assert not _lines_of(out, "worker.3") and not _lines_of(out, "flower")
    assert f"ready: coordinator and 2 worker(s) on redis://127.0.0.1:{port}/0" in out
    example = _lines_of(out, "example")
    assert "completed" in example and any('"released": true' in line for line in example)
    assert "example finished with exit code 0" in out
    _none_left(port)


def _start_dev(*args: str, log: Path) -> subprocess.Popen[bytes]:
    # A session of its own, like a terminal's foreground job: killpg stands in for Ctrl-C.
    return subprocess.Popen(_dev_argv(*args), env=_dev_env(), cwd=ROOT, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_dev_with_flower_stops_everything_on_a_signal(sig: int, tmp_path: Path) -> None:
    port, flower_port = free_port(), free_port()
    log = tmp_path / "dev.log"
    proc = _start_dev("--workers", "1", "--redis-port", str(port), "--flower-port",
                      str(flower_port), "--no-example", log=log)
    try:
        login = wait_for(lambda: re.search(r"\(log in as (dev:\S+)\)", log.read_text()),
                         120, 0.2, what="dev to print Flower's login").group(1)
        assert get_json(f"http://127.0.0.1:{flower_port}/api/workers") is None  # 401
        workers = wait_for(lambda: _get_json_as(f"http://127.0.0.1:{flower_port}/api/workers",
                                                login), 120, 0.2, what="Flower's API")
        assert any(name.startswith("worker1@") for name in workers), workers
        assert _leftovers(port)  # the check below can see the children
        os.killpg(proc.pid, sig)
        assert proc.wait(60) == 0, log.read_text()
        assert not answers(flower_port)
        _none_left(port)
        assert "stopping" in log.read_text()
    finally:
        _stop(proc)


def test_dev_stops_promptly_when_interrupted_while_starting(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "dev.log"
    proc = _start_dev("--workers", "2", "--no-flower", "--redis-port", str(port), log=log)
    try:
        wait_for(lambda: _lines_of(log.read_text(), "redis"), 60, what="redis-server's output")
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()
        out = log.read_text()
        # Stopped where it was: it neither announced the cluster nor started the example.
        assert "ready:" not in out and not _lines_of(out, "example")
        assert "stopping" in out
        _none_left(port)
    finally:
        _stop(proc)


def test_dev_refuses_a_port_something_else_listens_on() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        proc = subprocess.run(_dev_argv("--redis-port", str(port), "--no-flower"),
                              env=_dev_env(), cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
    assert proc.returncode == 1
    assert "something other than Redis" in proc.stderr
    assert f"listens at 127.0.0.1:{port}" in proc.stderr
    _none_left(port)


def test_dev_uses_the_redis_the_settings_name(redis_url: str) -> None:
    """ORCHESTRATOR_REDIS_URL (or --redis-url) is where everything goes; nothing is started,
    and nothing is written to whatever answers on 6379."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    env = {**_dev_env(), "ORCHESTRATOR_REDIS_URL": redis_url}
    proc = subprocess.run(_dev_argv("--workers", "1", "--no-flower", "--exit-after-example"),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert not _lines_of(out, "redis")  # the configured one answered: none started
    assert f"using the Redis already at 127.0.0.1:{port}" in out
    assert f"ready: coordinator and 1 worker(s) on {redis_url}" in out
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.keys("deploy:run:*"), "the example's run is not in the configured Redis"
    finally:
        client.close()


def test_dev_refuses_a_port_beside_a_configured_url(redis_url: str, tmp_path: Path) -> None:
    log = tmp_path / "dev.log"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "--redis-url", redis_url,
                             "dev", "--redis-port", str(free_port()), "--no-flower",
                             "--no-example"], env=_dev_env(), cwd=ROOT, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert proc.wait(60) == 2, log.read_text()
        assert "--redis-port" in log.read_text()
    finally:
        _stop(proc)  # it started a topology instead


def _get_json_as(url: str, login: str) -> Any:
    """The JSON at `url` fetched with basic auth, or None while nothing answers."""
    import base64
    import urllib.request

    token = base64.b64encode(login.encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """After a failed test: let dev stop what it started (its children have sessions of
    their own, so SIGKILL of its group would orphan them), then make sure."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
