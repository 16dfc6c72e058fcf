"""The README stays true: its configuration table, its commands, its Python examples."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml

from orchestrator import Settings
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_configuration_table_lists_every_setting() -> None:
    documented = set(re.findall(r"^\| `ORCHESTRATOR_([A-Z_]+)` \|", README, re.MULTILINE))
    fields = {f.name.upper() for f in dataclasses.fields(Settings)}
    assert documented == fields


def test_ci_runs_the_readme_test_command() -> None:
    command = ".venv/bin/python -m pytest -q"
    assert command in README
    assert command in (ROOT / ".ci" / "run").read_text()


def test_every_cli_command_is_documented() -> None:
    from orchestrator.cli import cli

    section = README.split("## Command line", 1)[1].split("\n## ", 1)[0]
    first_cells = " ".join(line.split("|")[1] for line in section.splitlines()
                           if line.startswith("| `orchestrator"))
    missing = [n for n in cli.commands if not re.search(rf"\b{n}\b", first_cells)]
    assert missing == []


# ---- the README's Python runs, and prints what it says it prints ----------------------------

BLOCK = re.compile(r"(?:^<!-- (?P<mark>[^\n]*?) -->\n)?^```python\n(?P<code>.*?)^```$",
                   re.MULTILINE | re.DOTALL)
NEEDS_CLUSTER, NOT_RUN = "run: needs a cluster", "not-run:"


def _blocks() -> list[Any]:
    return [pytest.param(m["mark"] or "", m["code"], id=f"line{README[:m.start()].count(chr(10))}")
            for m in BLOCK.finditer(README)]


def _expected_output(code: str) -> list[str]:
    """Each `print(...)` line states what it prints in a trailing comment."""
    lines = [line for line in code.splitlines() if line.startswith("print(")]
    missing = [line for line in lines if "  # " not in line]
    assert not missing, f"say what these print, in a trailing comment: {missing}"
    return [line.rsplit("  # ", 1)[1].strip() for line in lines]


def test_the_readme_has_python_to_run() -> None:
    marks = [p.values[0] for p in _blocks()]
    assert len(marks) >= 2 and not [m for m in marks if m.startswith(NOT_RUN)]
    assert {m.split(" (")[0] for m in marks} <= {"", NEEDS_CLUSTER}, marks


@pytest.mark.parametrize(("mark", "code"), _blocks())
def test_readme_python_block_runs(mark: str, code: str, redis_url: str,
                                  request: pytest.FixtureRequest) -> None:
    """Each block in a fresh interpreter, from the repository root, against the test Redis
    (and a real coordinator and workers where it says it needs a cluster)."""
    if mark.startswith(NOT_RUN):
        pytest.skip(mark)
    if mark.startswith(NEEDS_CLUSTER):
        request.getfixturevalue("cluster")
    expected = _expected_output(code)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "ORCHESTRATOR_REDIS_URL": redis_url})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == expected


# ---- Flower is never open ------------------------------------------------------------------

OPEN_FLOWER = re.compile(r"FLOWER_UNAUTHENTICATED_API\s*[=:]\s*\"?(true|1|yes|on)", re.I)


def test_flower_always_asks_for_a_password_and_compose_publishes_it_on_loopback() -> None:
    compose_text = (ROOT / "docker-compose.yml").read_text()
    for text in (README, compose_text):
        assert not OPEN_FLOWER.search(text)
    flower = yaml.safe_load(compose_text)["services"]["flower"]
    assert flower["ports"] and all(p.startswith("127.0.0.1:") for p in flower["ports"])
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert "FLOWER_BASIC_AUTH=" in README
