"""The web console and the JSON API (`orchestrator console`)."""

from ._app import create_console
from ._auth import AuthOptions

__all__ = ["AuthOptions", "create_console"]
