"""Other code published under version 1's label: refused while version 1 is served."""

from __future__ import annotations

from typing import Any

from orchestrator import END, START, Workflow


def a(ctx: Any) -> Any:
    return END


rollout = (Workflow("Rollout", "Not the version 1 the cluster runs", version="1")
           .persistence(key_prefix="roll:").flow({START: "A", "A": a}))
