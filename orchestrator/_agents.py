"""Agents: resources a step opens and must close. The runtime closes what a step left open.

An agent is anything with a `close()` (sync or async). `ctx.agents.reviewer(...)` calls the
factory and hands back a `AgentHandle` that forwards attribute access to the agent, works
as `with` / `async with`, and can be awaited (so `await ctx.agents.reviewer()` works for
sync and async factories alike).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Generator, Mapping
from typing import Any


class AgentHandle:
    def __init__(self, name: str, agent: Any) -> None:
        self._name = name
        self._agent = agent
        self.closed = False

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._agent, attr)

    def close(self) -> Any:
        """Close the agent once; returns an awaitable if the agent's close is async."""
        if self.closed:
            return None
        self.closed = True
        result = self._agent.close()
        return result if inspect.isawaitable(result) else None

    def __await__(self) -> Generator[Any, None, AgentHandle]:
        return _itself(self).__await__()

    def __enter__(self) -> AgentHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        pending = self.close()
        if pending is not None:
            _run_sync(pending)

    async def __aenter__(self) -> AgentHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pending = self.close()
        if pending is not None:
            await pending


async def _itself(handle: AgentHandle) -> AgentHandle:
    return handle


class AgentBox:
    """`ctx.agents`: one attribute per declared factory."""

    def __init__(self, factories: Mapping[str, Callable[..., Any]]) -> None:
        self._factories = factories
        self._opened: list[AgentHandle] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        try:
            factory = self._factories[name]
        except KeyError:
            raise AttributeError(
                f"no agent {name!r}; declared: {sorted(self._factories)}") from None

        def open_agent(*args: Any, **kwargs: Any) -> Any:
            made = factory(*args, **kwargs)
            if inspect.isawaitable(made):
                return self._adopt_later(name, made)
            return self._adopt(name, made)

        return open_agent

    def _adopt(self, name: str, agent: Any) -> AgentHandle:
        if not callable(getattr(agent, "close", None)):
            raise TypeError(f"agent {name!r} has no close() method")
        handle = AgentHandle(name, agent)
        self._opened.append(handle)
        return handle

    async def _adopt_later(self, name: str, made: Any) -> AgentHandle:
        return self._adopt(name, await made)

    def close_leftovers(self) -> list[dict[str, Any]]:
        """Close every agent the step left open; one history note for each."""
        notes = []
        for handle in self._opened:
            if handle.closed:
                continue
            note: dict[str, Any] = {"event": "agent_closed_by_runtime", "agent": handle._name}
            try:
                pending = handle.close()
                if pending is not None:
                    _run_sync(pending)
            except Exception as exc:  # closing must never mask the step's own outcome
                note["error"] = f"{type(exc).__name__}: {exc}"
            notes.append(note)
        return notes


def _run_sync(awaitable: Any) -> None:
    """Finish an async close from sync code, even if an event loop runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(_await(awaitable))
        return
    done = threading.Thread(target=lambda: asyncio.run(_await(awaitable)))
    done.start()
    done.join()


async def _await(awaitable: Any) -> None:
    await awaitable


class EchoAgent:
    """A small example agent that needs no network: it reviews text by rules."""

    def __init__(self, name: str = "reviewer", strict: bool = False) -> None:
        self.name = name
        self.strict = strict
        self.closed = False
        self.calls = 0

    def review(self, text: str) -> dict[str, Any]:
        if self.closed:
            raise RuntimeError(f"agent {self.name} is closed")
        self.calls += 1
        problems = [w for w in ("TODO", "FIXME", "XXX") if w in text]
        return {"approved": not problems and (not self.strict or len(text) > 0),
                "problems": problems, "by": self.name}

    def close(self) -> None:
        self.closed = True
