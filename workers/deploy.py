"""The seed's BuildAndDeploy: Clone -> Build (sets the artifact) -> Test -> Deploy -> END."""

from __future__ import annotations

import hashlib

from pydantic import BaseModel

from orchestrator import END, START, Next, Workflow, step


class DeployInput(BaseModel):
    repo: str
    environment: str = "staging"


class DeployState(BaseModel):
    artifact: str | None = None
    commit: str | None = None


class CloneResult(BaseModel):
    repo: str
    commit: str


@step(output=CloneResult)
async def clone(ctx) -> Next:
    commit = hashlib.sha1(ctx.input.repo.encode()).hexdigest()[:7]
    ctx.set_state(commit=commit)
    return Next("Build", output=CloneResult(repo=ctx.input.repo, commit=commit))


async def build(ctx) -> Next:
    ctx.set_state(artifact="out.tar")
    return Next("Test", output={"artifact": "out.tar", "commit": ctx.state.commit})


def test(ctx) -> Next:
    assert ctx.state.artifact == "out.tar"
    return Next("Deploy", output={"passed": 42, "failed": 0})


def deploy(ctx) -> Next:
    return Next(END, output={"deployed": ctx.state.artifact, "to": ctx.input.environment})


build_and_deploy = (
    Workflow("BuildAndDeploy", "Build, test, deploy")
    .input(DeployInput)
    .state(DeployState)
    .persistence(enabled=True, store="redis", key_prefix="deploy:")
    .flow({
        START: lambda ctx: "Clone",
        "Clone": clone,
        "Build": build,
        "Test": test,
        "Deploy": deploy,
    })
)
