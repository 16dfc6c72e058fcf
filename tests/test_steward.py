"""The Steward registers workflows and publishes them; the catalog describes them."""

from __future__ import annotations

import types

import pytest
import redis

from orchestrator import Steward
from orchestrator._celery import find_workflows
from orchestrator._steward import read_catalog
from tests import flows
from workers.deploy import build_and_deploy


def test_steward_registers_publishes_and_is_found_in_a_module(rclient: redis.Redis) -> None:
    steward = Steward([flows.loop])
    assert steward.register(build_and_deploy) is build_and_deploy
    with pytest.raises(ValueError, match="different workflow"):
        steward.register(flows.loop.flow({"__start__": "Tick", "Tick": flows.tick,
                                          "Other": flows.tick}))
    module = types.ModuleType("apps.catalogued")
    module.steward = steward  # type: ignore[attr-defined]
    assert {w.name for w in find_workflows(module)} == {"Loop", "BuildAndDeploy"}

    steward.publish(rclient, host="w1@box")
    steward.publish(rclient, host="w2@box")
    catalog = read_catalog(rclient)
    entry = catalog["BuildAndDeploy"]
    assert entry.hosts == ["w1@box", "w2@box"]
    assert entry.version == build_and_deploy.version and entry.key_prefix == "deploy:"
    assert entry.initial_state == {"commit": None, "artifact": None, "released": False}
    assert entry.spec().steps["Clone"].queue == "orchestrator.steps"
    assert catalog["Loop"].graph["Tick"] == ["Tick", "__end__"]
