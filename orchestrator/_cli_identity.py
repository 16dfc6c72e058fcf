"""`orchestrator users ...`, `tokens ...` and `audit verify`: users, API tokens and the
history's audit chain from the command line.

cli.py hands in its error guard (the exit-code table) and text escaping, as for
`schedules` (it also runs as `__main__`, so it is not imported back from here). Unknown
users and tokens exit 3, an existing user or a bad name 2, Redis down 5.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console

from ._audit import KEY_ENV
from ._client import Client
from ._config import Settings
from ._identity import ROLES, UnknownToken, UnknownUser, Users
from ._runtime import RunNotFound
from ._stores import RedisStore

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_NOT_FOUND = 3


class AuditMismatch(Exception):
    """`audit verify` found an entry that does not match (exit 1)."""


def users_for(settings: Settings) -> Users:
    return Users(key_prefix=settings.key_prefix, url=settings.redis_url)


def groups_of(settings: Settings, name: str) -> tuple[str, ...]:
    """The groups of user `name` ((): not a registered user), for `group:` approvers."""
    user = users_for(settings).find(name)
    return () if user is None else user.groups


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def identity_commands(guard: Decorator, text: Callable[[Any], str]) -> list[click.Command]:
    def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
        inner = guard(fn)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return inner(*args, **kwargs)
            except (UnknownUser, UnknownToken) as exc:
                err.print(f"[red]error:[/red] {text(exc.args[0])}")
                sys.exit(EXIT_NOT_FOUND)

        wrapper.__name__ = fn.__name__
        wrapper.__doc__ = fn.__doc__
        return wrapper

    def emit(data: Any) -> None:
        click.echo(json.dumps(data, indent=2))

    # ---- users ------------------------------------------------------------------------

    @click.group()
    def users() -> None:
        """Users of the console and API: name, groups, role, argon2 password hash."""

    @users.command(name="add")
    @click.argument("name")
    @click.option("--group", "groups", multiple=True,
                  help="A group (repeat for several); gates may list `group:<name>`.")
    @click.option("--role", type=click.Choice(ROLES), default="viewer", show_default=True)
    @click.option("--password-stdin", is_flag=True,
                  help="Read the password from the first line of stdin instead of asking.")
    @click.pass_obj
    @guarded
    def users_add(settings: Settings, name: str, groups: tuple[str, ...], role: str,
                  password_stdin: bool) -> None:
        """Add user NAME; asks for the password (never an argument: argv is visible)."""
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = click.prompt("password", hide_input=True,
                                    confirmation_prompt=True, err=True)
        user = users_for(settings).add(name, password, groups=groups, role=role)
        out.print(f"{text(user.name)}: added ({user.role}"
                  f"{', groups ' + text(', '.join(user.groups)) if user.groups else ''})")

    @users.command(name="list")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    @guarded
    def users_list(settings: Settings, as_json: bool) -> None:
        """Users, their role and groups (never their password hashes)."""
        rows = [u.public() for u in users_for(settings).list()]
        if as_json:
            emit(rows)
            return
        for r in rows:
            out.print(f"{text(r['name'])}  {r['role']}  {text(', '.join(r['groups'])) or '-'}"
                      f"  {_when(r['created'])}")

    @users.command(name="remove")
    @click.argument("name")
    @click.pass_obj
    @guarded
    def users_remove(settings: Settings, name: str) -> None:
        """Remove user NAME and revoke their tokens."""
        dropped = users_for(settings).remove(name)
        out.print(f"{text(name)}: removed ({dropped} token{'s' * (dropped != 1)} revoked)")

    # ---- tokens -----------------------------------------------------------------------

    @click.group()
    def tokens() -> None:
        """API tokens: shown once when created; only their hash is stored."""

    @tokens.command(name="create")
    @click.argument("name")
    @click.pass_obj
    @guarded
    def tokens_create(settings: Settings, name: str) -> None:
        """Create an API token for user NAME and print it (once: it is not kept)."""
        click.echo(users_for(settings).create_token(name))

    @tokens.command(name="list")
    @click.option("--user", "name", default=None, help="Only this user's tokens.")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    @guarded
    def tokens_list(settings: Settings, name: str | None, as_json: bool) -> None:
        """Token ids (the SHA-256 of each token), owner, creation time."""
        rows = users_for(settings).tokens(name)
        if as_json:
            emit(rows)
            return
        for r in rows:
            out.print(f"{r['id'][:16]}  {text(r['user'])}  {_when(r['created'])}")

    @tokens.command(name="revoke")
    @click.argument("token", required=False)
    @click.option("--id", "token_id", default=None,
                  help="The token's id as `tokens list` shows it (8 characters or more).")
    @click.option("--stdin", "from_stdin", is_flag=True, help="Read the token from stdin.")
    @click.pass_obj
    @guarded
    def tokens_revoke(settings: Settings, token: str | None, token_id: str | None,
                      from_stdin: bool) -> None:
        """Revoke a token: given by its id (--id), on stdin (--stdin) or as TOKEN."""
        given = [v for v in (token, token_id) if v] + (
            [sys.stdin.readline().strip()] if from_stdin else [])
        if len(given) != 1:
            raise click.UsageError("give the token once: TOKEN, --id ID or --stdin")
        users_for(settings).revoke(given[0])
        out.print("revoked")

    # ---- audit ------------------------------------------------------------------------

    @click.group()
    def audit() -> None:
        """The runs' tamper-evident history (ORCHESTRATOR_AUDIT_KEY)."""

    @audit.command(name="verify")
    @click.argument("run_id")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    @guarded
    def audit_verify(settings: Settings, run_id: str, as_json: bool) -> None:
        """Check RUN's history against its HMAC chain; exit 1 at the first entry that no
        longer matches (it is named), 2 without a key."""
        if not settings.audit_key:
            raise click.UsageError(f"{KEY_ENV} is not set: there is nothing to check "
                                   f"the history's macs with")
        handle = Client(settings=settings).attach(run_id)
        store = handle._store
        if not isinstance(store, RedisStore):  # pragma: no cover - a Client's are Redis
            raise click.UsageError("only runs kept in Redis carry an audit chain")
        verdict = store.audit(handle.run_id, settings.audit_key)
        if verdict is None:
            raise RunNotFound(f"no run {run_id!r}")  # expired between attach and here
        if as_json:
            emit({"run_id": handle.run_id, **verdict.as_dict()})
        elif verdict.ok:
            trimmed = (f", {verdict.dropped} trimmed from the middle"
                       if verdict.dropped else "")
            out.print(f"{text(handle.run_id)}: ok, {verdict.checked} entries match"
                      f"{trimmed}; head mac {verdict.head_mac}")
        if not verdict.ok:
            err.print(f"[red]error:[/red] {text(handle.run_id)}: entry {verdict.first_bad} "
                      f"does not match: {text(verdict.reason)}")
            sys.exit(1)

    return [users, tokens, audit]
