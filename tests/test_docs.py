"""The README stays true: its configuration table and its commands."""

from __future__ import annotations

import dataclasses
import re

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
