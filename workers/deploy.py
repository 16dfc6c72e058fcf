"""The seed's BuildAndDeploy, as the seed writes it.

Clone -> Build fans out to three platform builds -> Bundle sets the artifact -> Test ->
Deploy, which gates production on ops-lead's approval and sends staging straight on ->
Release -> END.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel

from orchestrator import END, START, HumanApproval, Next, Parallel, Wait, Workflow, step


class DeployInput(BaseModel):
    repo: str
    environment: str = "staging"


class DeployState(BaseModel):
    commit: str | None = None
    artifact: str | None = None
    released: bool = False


class CloneResult(BaseModel):
    repo: str
    commit: str


@step(output=CloneResult)
async def clone(ctx: Any) -> Next:
    commit = hashlib.sha1(ctx.input.repo.encode()).hexdigest()[:7]
    ctx.set_state(commit=commit)
    return Next("Build", output=CloneResult(repo=ctx.input.repo, commit=commit))


def build(ctx: Any) -> Parallel:
    return Parallel([build_linux, build_mac, build_win], "Bundle")


def _build_for(platform: str, ctx: Any) -> dict[str, str]:
    return {"platform": platform, "binary": f"{ctx.input.repo.split('/')[-1]}-{platform}"}


def build_linux(ctx: Any) -> dict[str, str]:
    return _build_for("linux", ctx)


def build_mac(ctx: Any) -> dict[str, str]:
    return _build_for("mac", ctx)


def build_win(ctx: Any) -> dict[str, str]:
    return _build_for("win", ctx)


async def bundle(ctx: Any) -> Next:
    binaries = [ctx.step_results[p]["binary"] for p in ("build_linux", "build_mac", "build_win")]
    ctx.set_state(artifact="out.tar")
    return Next("Test", output={"artifact": "out.tar", "contains": binaries})


def test(ctx: Any) -> Next:
    assert ctx.state.artifact == "out.tar"
    return Next("Deploy", output={"passed": 42, "failed": 0})


def deploy(ctx: Any) -> Wait | str:
    if ctx.input.environment == "production":  # production gates; staging goes straight on
        return Wait(HumanApproval(
            approvers=["ops-lead"],
            prompt=f"Release {ctx.state.artifact} of {ctx.input.repo} to production?",
            payload={"commit": ctx.state.commit},
        ), "Release")
    return "Release"


def release(ctx: Any) -> Next:
    ctx.set_state(released=True)
    return Next(END, output={"released": ctx.state.artifact, "to": ctx.input.environment})


build_and_deploy = (
    Workflow("BuildAndDeploy", "Build, test, deploy")
    .input(DeployInput)
    .state(DeployState)
    .persistence(key_prefix="deploy:")
    .flow({
        START: lambda ctx: "Clone",
        "Clone": clone,
        "Build": build,
        "Bundle": bundle,
        "Test": test,
        "Deploy": deploy,
        "Release": release,
    })
)
