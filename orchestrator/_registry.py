"""The workflows a process hosts, and the engine's view of each (its FlowSpec)."""

from __future__ import annotations

from ._definition import Workflow
from ._records import FlowSpec, StepSpec
from ._reducers import reducers_of


class UnknownWorkflow(LookupError):
    pass


class Registry:
    def __init__(self) -> None:
        self.workflows: dict[str, Workflow] = {}
        self._specs: dict[str, FlowSpec] = {}

    def register(self, wf: Workflow) -> None:
        known = self.workflows.get(wf.name)
        if known is wf:  # every start registers: keep that free
            return
        wf.check_complete()
        if known is not None and known.content_hash != wf.content_hash:
            raise ValueError(f"two different workflows are named {wf.name!r}")
        self.workflows[wf.name] = wf
        self._specs[wf.name] = spec_of(wf)

    def workflow(self, name: str) -> Workflow:
        try:
            return self.workflows[name]
        except KeyError:
            raise UnknownWorkflow(
                f"no workflow {name!r} here; known: {sorted(self.workflows)}") from None

    def spec(self, name: str) -> FlowSpec | None:
        return self._specs.get(name)

    def spec_for(self, name: str, version: str) -> FlowSpec | None:
        """The hosted definition of `name` if it is `version` (runs are pinned to theirs)."""
        spec = self._specs.get(name)
        return spec if spec is not None and spec.version == version else None

    def key_prefixes(self) -> list[str]:
        return sorted({wf.persistence_options.key_prefix for wf in self.workflows.values()})


def spec_of(wf: Workflow) -> FlowSpec:
    steps = {}
    for name in wf.step_names():
        sd = wf.step_def(name)
        steps[name] = StepSpec(sd.options.policy, getattr(sd.fn, "__orchestrator_route__", None))
    return FlowSpec(wf.name, wf.version_id, steps, reducers_of(wf.state_model))
