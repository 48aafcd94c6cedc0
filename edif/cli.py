"""The `edif` command line: one entry point for every eDIF tool.

`main` is a click group. Each concern adds its subcommand (group) to it: `token` lives here;
`up`, `demo`, `agent` and `broker` are attached the same way, as `@main.command()` /
`@main.group()` or `main.add_command(...)` from their own module. Commands keep stdout for
their result alone (a token, a JSON document) so they compose in shell pipelines and `$(...)`;
notes go to stderr. Usage errors exit 2 (click's convention); eDIF errors exit 1.

Flow of `edif token issue`: parse and check the options, open `KeyStore.default()` (under
`$EDIF_HOME/keys`, creating the signing key on first use), sign, print the token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import BROKER_AUDIENCE, TokenIssuer
from edif.errors import EdifError

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+)\s*([smhd]?)")


def parse_duration(text: str) -> int:
    """Seconds in "3600", "90s", "15m", "12h" or "30d"; ValueError for anything else or 0."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match or int(match[1]) == 0:
        raise ValueError(
            f"{text!r} is not a duration: use seconds (3600) or a positive number with "
            "s, m, h or d (90s, 15m, 12h, 30d)"
        )
    return int(match[1]) * _UNITS[match[2]]


class Duration(click.ParamType):
    """A click option type for `parse_duration`."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@contextmanager
def edif_errors() -> Iterator[None]:
    """Turn an EdifError into a clean one-line CLI error (exit 1) instead of a traceback."""
    try:
        yield
    except EdifError as exc:
        raise click.ClickException(exc.message) from exc


@click.group()
@click.version_option(package_name="edif-mesh", prog_name="edif")
def main() -> None:
    """eDIF mesh: a federated broker and site agents for nnsight remote execution."""


@main.group()
def token() -> None:
    """Issue API tokens and publish the public keys that verify them."""


@token.command("issue")
@click.option("--sub", required=True, help="Who the token is for: a user or service id.")
@click.option(
    "--role",
    required=True,
    type=click.Choice([role.value for role in Role]),
    help="What the holder may do.",
)
@click.option(
    "--ttl",
    type=Duration(),
    default="30d",
    show_default=True,
    help="Lifetime: seconds (3600) or 90s, 15m, 12h, 30d.",
)
@click.option("--group", "groups", multiple=True, help="A group of the holder; repeatable.")
@click.option("--site", help="The site the token speaks for; required with --role site.")
@click.option(
    "--audience", default=BROKER_AUDIENCE, show_default=True, help="The service that accepts it."
)
def issue(
    sub: str, role: str, ttl: int, groups: tuple[str, ...], site: str | None, audience: str
) -> None:
    """Print a signed token (and nothing else) on stdout."""
    if not sub.strip():
        raise click.BadParameter("must not be empty", param_hint="--sub")
    if role == Role.SITE and not site:
        raise click.UsageError("--role site needs --site NAME: a site token names its site")
    with edif_errors():
        signed = TokenIssuer(KeyStore.default()).issue(
            sub, Role(role), ttl, audience=audience, groups=groups, site=site
        )
    click.echo(signed)


@token.command("jwks")
def jwks() -> None:
    """Print the public keys as a JWKS (JSON), creating the signing key if there is none."""
    with edif_errors():
        store = KeyStore.default()
        store.signing_key()  # an empty key set would verify nothing: make the first key now
        document = store.jwks()
    click.echo(json.dumps(document, indent=2))


@main.command("up")
@click.option("--demo", is_flag=True, required=True, help="Broker + three demo sites here.")
@click.option("--port", type=int, default=0, help="Broker port (default: a free one).")
@click.option("--time-limit", type=float, default=None, help="Per-job execution limit, seconds.")
@click.option("--heartbeat", type=float, default=None, help="Status heartbeat period, seconds.")
@click.option(
    "--state-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the mesh's addresses and pids here (JSON) once it is up.",
)
@click.option("--wait-models", is_flag=True, help="Report ready only once every model runs.")
def up(
    demo: bool,
    port: int,
    time_limit: float | None,
    heartbeat: float | None,
    state_file: Path | None,
    wait_models: bool,
) -> None:
    """Run the mesh in the foreground until Ctrl-C (SIGINT) or SIGTERM."""
    from edif.config import edif_home
    from edif.up import DemoOptions, run_foreground

    options = DemoOptions(
        home=edif_home(),
        port=port,
        time_limit_s=time_limit,
        heartbeat_s=heartbeat,
        state_file=state_file,
    )
    with edif_errors():
        run_foreground(options, wait_models)


@main.command("demo")
def demo() -> None:
    """Start the demo mesh, run the researcher example against it, print, shut down."""
    from edif.demo.run import run_demo

    with edif_errors():
        raise SystemExit(run_demo())


@main.group()
def agent() -> None:
    """Run a site agent."""


@agent.command("run")
@click.option(
    "--site",
    "site_file",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="The site's YAML config (deploy/sites/<site>.yaml).",
)
@click.option("--listen", default=None, help="gRPC listen address, e.g. 127.0.0.1:50051.")
@click.option("--ray-address", default=None, help="Join this Ray cluster (default: start one).")
@click.option("--broker-jwks", default=None, help="The trusted broker's JWKS: file or URL.")
def agent_run(
    site_file: Path, listen: str | None, ray_address: str | None, broker_jwks: str | None
) -> None:
    """Serve the site's models to the broker until SIGINT/SIGTERM."""
    from site_agent.main import AgentSettings, run

    overrides = {"listen": listen, "ray_address": ray_address, "broker_jwks": broker_jwks}
    settings = AgentSettings(**{k: v for k, v in overrides.items() if v is not None})
    with edif_errors():
        run(site_file, settings)


@main.group()
def broker() -> None:
    """Run the broker."""


@broker.command("run")
def broker_run() -> None:
    """Serve the nnsight-compatible API (settings from EDIF_BROKER_* variables)."""
    from broker.config import BrokerSettings
    from broker.main import run

    with edif_errors():
        run(BrokerSettings())
