"""`orchestrator console`: serve the web console and the JSON API with uvicorn."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import click

from ._config import Settings

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def console_command(guard: Decorator, bad_input: type[Exception]) -> click.Command:
    @click.command()
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to listen on.")
    @click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
    @click.option("--certfile", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="Serve HTTPS with this certificate (PEM).")
    @click.option("--keyfile", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="The certificate's private key (PEM).")
    @click.option("--insecure-http", is_flag=True,
                  help="Allow plain HTTP on a non-loopback address (passwords and session "
                       "cookies then cross the network in clear).")
    @click.option("--trust-header", default=None, metavar="HEADER",
                  help="Take the signed-in user's name from this header (e.g. "
                       "X-Forwarded-User), set by a single sign-on proxy; only from "
                       "--trusted-proxy addresses.")
    @click.option("--trusted-proxy", "trusted_proxies", multiple=True, metavar="ADDR",
                  help="An address or network (CIDR) of the proxy that sets --trust-header; "
                       "repeatable.")
    @click.option("--log-level", default="info", show_default=True,
                  type=click.Choice(["critical", "error", "warning", "info", "debug"]))
    @click.pass_obj
    @guard
    def console(settings: Settings, host: str, port: int, certfile: str | None,
                keyfile: str | None, insecure_http: bool, trust_header: str | None,
                trusted_proxies: tuple[str, ...], log_level: str) -> None:
        """Serve the web console and the JSON API (/api/v1)."""
        import uvicorn

        from ._console import AuthOptions, create_console

        if bool(certfile) != bool(keyfile):
            raise bad_input("--certfile and --keyfile go together")
        if trust_header and not trusted_proxies:
            raise bad_input("--trust-header needs --trusted-proxy: the header is believed "
                            "only from the proxy's address")
        try:
            options = AuthOptions(trust_header, trusted_proxies,
                                  secure_cookies=bool(certfile or trust_header))
            options.networks()
        except ValueError as exc:
            raise bad_input(f"--trusted-proxy: {exc}") from None
        if not (is_loopback(host) or certfile or insecure_http or trust_header):
            raise bad_input(f"refusing to serve plain HTTP on {host}: give --certfile and "
                            f"--keyfile, sit behind a proxy (--trust-header, "
                            f"--trusted-proxy), or pass --insecure-http")
        app = create_console(settings, options)
        scheme = "https" if certfile else "http"
        click.echo(f"console on {scheme}://{host}:{port}/ (API: /api/v1, schema: "
                   f"/api/v1/openapi.json)", err=True)
        # proxy_headers off: the trusted-proxy check must see the real peer's address.
        uvicorn.run(app, host=host, port=port, ssl_certfile=certfile, ssl_keyfile=keyfile,
                    proxy_headers=False, log_level=log_level, server_header=False)

    return console
