"""What a step sees: `ctx.input`, `ctx.state`, `ctx.set_state`, `ctx.step_results`, agents."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pydantic import BaseModel

from ._agents import AgentBox


class StepResults(Mapping[str, Any]):
    """Step name -> that step's latest output; a model instance where the step declared one."""

    def __init__(self, raw: Mapping[str, Any], models: Mapping[str, type[BaseModel] | None]):
        self._raw = raw
        self._models = models

    def __getitem__(self, name: str) -> Any:
        value = self._raw[name]
        model = self._models.get(name)
        return model.model_validate(value) if model is not None and value is not None else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"StepResults({dict(self._raw)!r})"


class StepContext:
    """The handle a step function receives. `set_state` validates before it changes anything."""

    def __init__(
        self,
        *,
        run_id: str,
        step: str,
        attempt: int,
        token: int,
        input: BaseModel,
        state_model: type[BaseModel],
        state: dict[str, Any],
        step_results: StepResults,
        agents: AgentBox,
        item: Any = None,
        branch: str | None = None,
        on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.run_id = run_id
        self.step = step
        self.attempt = attempt
        self.branch = branch
        self.item = item
        self.input = input
        self.step_results = step_results
        self.agents = agents
        self._state_model = state_model
        self._state = state_model.model_validate(state)
        self._patch: dict[str, Any] = {}
        self._on_checkpoint = on_checkpoint
        self.idempotency_key = f"{run_id}:{token}" + (f":{branch}" if branch else "")

    @property
    def state(self) -> Any:
        return self._state

    def set_state(self, changes: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        """Shallow-merge `changes` into the state; a ValidationError leaves it unchanged."""
        update = {**(changes or {}), **kwargs}
        unknown = set(update) - set(self._state_model.model_fields)
        if unknown and self._state_model.model_config.get("extra") != "allow":
            fields = sorted(self._state_model.model_fields)
            raise ValueError(f"state has no field(s) {sorted(unknown)}; fields: {fields}")
        merged = {**self._state.model_dump(), **update}
        new_state = self._state_model.model_validate(merged)
        dumped = new_state.model_dump(mode="json")
        patch = {k: dumped[k] for k in update}
        self._state = new_state
        self._patch.update(patch)
        if self._on_checkpoint is not None:
            self._on_checkpoint(patch)

    @property
    def state_patch(self) -> dict[str, Any]:
        return dict(self._patch)

