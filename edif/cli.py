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
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import jwt as pyjwt

from auth import ledger
from auth.keys import KeyStore
from auth.pseudonym import Pseudonymizer
from auth.revocation import RevocationList
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
        store = KeyStore.default()
        signed = TokenIssuer(store).issue(
            sub, Role(role), ttl, audience=audience, groups=groups, site=site
        )
        ledger.record(store.directory, signed, Pseudonymizer.from_home(store.directory)(sub))
    click.echo(signed)


@token.command("revoke")
@click.option("--jti", help="The token's id (from `edif token list`).")
@click.option("--token", "token_text", help="The token itself (its id and expiry are read).")
def revoke(jti: str | None, token_text: str | None) -> None:
    """Refuse a token from now on (the broker notices on its next request)."""
    if bool(jti) == bool(token_text):
        raise click.UsageError("give exactly one of --jti or --token")
    store = KeyStore.default()
    if token_text:
        try:
            claims = pyjwt.decode(token_text.strip(), options={"verify_signature": False})
            jti, expires = str(claims["jti"]), float(claims["exp"])
        except (pyjwt.PyJWTError, KeyError, TypeError, ValueError) as exc:
            raise click.BadParameter("not a token with jti and exp", param_hint="--token") from exc
    else:
        known = {e["jti"]: e for e in ledger.entries(store.directory)}
        # Unknown ids are kept for a year: longer than any token eDIF issues by default.
        expires = float(known[jti]["exp"]) if jti in known else time.time() + 365 * 86400
    RevocationList(store.directory).revoke(str(jti), expires)
    click.echo(f"revoked {jti}", err=True)


@token.command("list")
def list_tokens() -> None:
    """Issued tokens (holder pseudonym, role, expiry) and whether each is revoked."""
    store = KeyStore.default()
    revoked = RevocationList(store.directory)
    now = time.time()
    click.echo(f"{'jti':<24} {'holder':<20} {'role':<11} {'expires (UTC)':<17} state")
    for entry in ledger.entries(store.directory):
        exp = float(entry.get("exp") or 0)
        state = (
            "revoked"
            if revoked.is_revoked(entry["jti"])
            else ("expired" if exp <= now else "valid")
        )
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(exp))
        click.echo(
            f"{entry['jti']:<24} {entry['holder']:<20} {entry['role']:<11} {when:<17} {state}"
        )


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
    """Run a site agent, join it to a broker, make it leave, or install it as a service."""


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
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Serve Prometheus /metrics on this port (default: EDIF_AGENT_METRICS_PORT, else off).",
)
def agent_run(
    site_file: Path,
    listen: str | None,
    ray_address: str | None,
    broker_jwks: str | None,
    metrics_port: int | None,
) -> None:
    """Serve the site's models to the broker until SIGINT/SIGTERM."""
    from site_agent.main import AgentSettings, run

    overrides = {
        "listen": listen,
        "ray_address": ray_address,
        "broker_jwks": broker_jwks,
        "metrics_port": metrics_port,
    }
    settings = AgentSettings(**{k: v for k, v in overrides.items() if v is not None})
    with edif_errors():
        run(site_file, settings)


_SITE_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@agent.command("join")
@click.option("--broker", "broker_url", required=True, envvar="EDIF_BROKER_URL", help="Broker URL.")
@click.option(
    "--token",
    "join_token",
    default=None,
    envvar="EDIF_JOIN_TOKEN",
    help="Join token (edif token issue --role site --site NAME --ttl 15m); or EDIF_JOIN_TOKEN. "
    "Not needed while the site credential stored by an earlier join is valid.",
)
@click.option("--site", "site_file", required=True, type=_SITE_FILE, help="The site's YAML.")
@click.option("--advertise", default=None, help="host:port the broker calls (default: --listen).")
@click.option("--listen", default=None, help="gRPC listen address, e.g. 0.0.0.0:50051.")
@click.option("--ray-address", default=None, help="Join this Ray cluster (default: start one).")
@click.option("--drain-timeout", type=float, default=60.0, show_default=True, help="Seconds.")
@click.option(
    "--walltime",
    default=None,
    help="Allocation length (Slurm time: MM, HH:MM:SS, D-HH:MM:SS): drain and leave before it "
    "ends. Default under Slurm: the job's end time.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the site credential is kept (default $EDIF_HOME/agent/<site>).",
)
def agent_join(
    broker_url: str,
    join_token: str | None,
    site_file: Path,
    advertise: str | None,
    listen: str | None,
    ray_address: str | None,
    drain_timeout: float,
    walltime: str | None,
    state_dir: Path | None,
) -> None:
    """Join a broker: place the models, register, serve until SIGTERM (then drain, leave)."""
    from site_agent.join import JoinOptions, run_join
    from site_agent.main import AgentSettings

    overrides = {"listen": listen, "ray_address": ray_address, "state_dir": state_dir}
    settings = AgentSettings(**{k: v for k, v in overrides.items() if v is not None})
    token = (join_token or "").strip() or None
    env = dict(os.environ)  # Slurm's variables: the allocation's end time
    options = JoinOptions(broker_url, token, advertise, drain_timeout, walltime, env)
    with edif_errors():
        run_join(site_file, options, settings)


@agent.command("leave")
@click.option("--site", "site_file", required=True, type=_SITE_FILE, help="The site's YAML.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait.")
def agent_leave(site_file: Path, timeout: float) -> None:
    """Make this machine's agent for the site deregister, drain its jobs and exit."""
    from site_agent.join import leave

    with edif_errors():
        pid = leave(site_file, timeout)
    click.echo(f"agent {pid} left", err=True)


@agent.command("install-service")
@click.option("--site", "site_file", required=True, type=_SITE_FILE, help="The site's YAML.")
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=Path("/etc/systemd/system"),
    show_default=True,
    help="Unit file, or a folder for edif-agent-<site>.service.",
)
@click.option(
    "--env-file",
    type=click.Path(path_type=Path),
    default=Path("/etc/edif/agent.env"),
    show_default=True,
    help="The EnvironmentFile the unit reads (EDIF_BROKER_URL, EDIF_JOIN_TOKEN, ...).",
)
def agent_install_service(site_file: Path, output: Path, env_file: Path) -> None:
    """Write a systemd unit that runs `edif agent join` for the site; print where."""
    from site_agent.config import load_site_config
    from site_agent.service_unit import write_unit

    with edif_errors():
        site = load_site_config(site_file).site
        try:
            target = write_unit(site, site_file, output, env_file)
        except OSError as exc:
            raise click.ClickException(f"cannot write the unit: {exc}") from exc
    click.echo(str(target))
    click.echo(f"then: systemctl daemon-reload && systemctl enable --now {target.name}", err=True)


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


# -- governance: quotas and usage (edif.admin_client talks to the broker's /admin/api) -------


def _admin_options(command: Any) -> Any:
    command = click.option(
        "--token", default=None, help="Governance/admin token (default: $EDIF_TOKEN)."
    )(command)
    return click.option(
        "--broker", "broker_url", default=None, help="Broker URL (default: $EDIF_BROKER_URL)."
    )(command)


def _admin_client(broker_url: str | None, token: str | None) -> Any:
    from edif.admin_client import AdminClient, AdminClientSettings

    settings = AdminClientSettings()
    return AdminClient(broker_url or settings.broker_url, token or settings.token)


@main.group()
def quota() -> None:
    """Show and set fair-use quota policies (governance and admin roles)."""


@quota.command("show")
@_admin_options
def quota_show(broker_url: str | None, token: str | None) -> None:
    """Print the defaults, role and group policies and the precedence rule (JSON)."""
    with edif_errors():
        click.echo(json.dumps(_admin_client(broker_url, token).quotas(), indent=2))


@quota.command("set")
@click.option("--role", default=None, help="Set the policy of this role.")
@click.option("--group", default=None, help="Set the policy of this group.")
@click.option("--rate", "rate_per_s", type=float, default=None, help="Requests per second.")
@click.option("--burst", type=int, default=None, help="Requests allowed back to back.")
@click.option("--max-concurrent", type=int, default=None, help="Unfinished jobs at once.")
@click.option("--max-payload-bytes", type=int, default=None, help="Request payload cap.")
@click.option("--max-result-bytes", type=int, default=None, help="Result size cap per job.")
@click.option(
    "--gpu-seconds",
    default=None,
    help="Per-user GPU-seconds per period, or 'unlimited'.",
)
@click.option(
    "--group-gpu-seconds",
    default=None,
    help="GPU-seconds the whole group shares per period (--group only), or 'unlimited'.",
)
@click.option("--period", type=click.Choice(["day", "week", "month"]), default=None)
@_admin_options
def quota_set(
    role: str | None,
    group: str | None,
    gpu_seconds: str | None,
    group_gpu_seconds: str | None,
    broker_url: str | None,
    token: str | None,
    **limits: Any,
) -> None:
    """Create or change one policy; options left out keep their value. Prints it (JSON)."""
    if (role is None) == (group is None):
        raise click.UsageError("name exactly one of --role R or --group G")
    if group_gpu_seconds is not None and group is None:
        raise click.UsageError("--group-gpu-seconds applies to a --group policy")
    changes = {k: v for k, v in limits.items() if v is not None}
    for field, value in (
        ("gpu_seconds", gpu_seconds),
        ("group_gpu_seconds", group_gpu_seconds),
    ):
        if value is None:
            continue
        if value.strip().lower() == "unlimited":
            changes[f"unlimited_{field}"] = True
            continue
        try:
            changes[f"{field}_per_period"] = float(value)
        except ValueError:
            raise click.BadParameter(
                "a number or 'unlimited'", param_hint=f"--{field.replace('_', '-')}"
            ) from None
    scope, name = ("role", role) if role is not None else ("group", group)
    with edif_errors():
        reply = _admin_client(broker_url, token).set_quota(scope, name, changes)
    click.echo(json.dumps(reply, indent=2))


@quota.command("delete")
@click.option("--role", default=None, help="Remove the policy of this role.")
@click.option("--group", default=None, help="Remove the policy of this group.")
@_admin_options
def quota_delete(
    role: str | None, group: str | None, broker_url: str | None, token: str | None
) -> None:
    """Remove one policy (the next rule in precedence applies again)."""
    if (role is None) == (group is None):
        raise click.UsageError("name exactly one of --role R or --group G")
    scope, name = ("role", role) if role is not None else ("group", group)
    with edif_errors():
        reply = _admin_client(broker_url, token).delete_quota(scope, name)
    click.echo(json.dumps(reply, indent=2))


@main.command("usage")
@click.option(
    "--period", type=click.Choice(["day", "week", "month"]), default="day", show_default=True
)
@_admin_options
def usage(period: str, broker_url: str | None, token: str | None) -> None:
    """Print GPU-seconds per user pseudonym and per group in the current period (JSON)."""
    with edif_errors():
        click.echo(json.dumps(_admin_client(broker_url, token).usage(period), indent=2))


# -- audit (governance: broker.audit) ---------------------------------------------------------

_audit_data_dir = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The broker's data dir (default: EDIF_BROKER_DATA_DIR, else $EDIF_HOME/broker).",
)


def _open_audit(data_dir: Path | None) -> Any:
    """The broker's audit log (an AuditError when there is none: verify must not pass on air)."""
    from broker.audit import open_audit_log
    from broker.config import BrokerSettings
    from edif.errors import AuditError

    settings = BrokerSettings(**({"data_dir": data_dir} if data_dir else {}))
    db = settings.data_dir / "audit" / "audit.db"
    if not db.exists():
        raise AuditError(f"no audit log at {db}: is this the broker's data dir?")
    return open_audit_log(settings.data_dir, settings.keys_dir, None)


def _when(text: str | None) -> float | None:
    """An ISO date/time (UTC unless it says otherwise), or a duration back from now (7d)."""
    import time
    from datetime import UTC, datetime

    if text is None:
        return None
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: use 2026-01-31, 2026-01-31T12:00 or 7d") from exc
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


@main.group()
def audit() -> None:
    """Verify, export and erase the broker's audit log (run on the broker's host)."""


@audit.command("verify")
@_audit_data_dir
@click.option("--quiet", is_flag=True, help="Print only the verdict, not the entries.")
def audit_verify(data_dir: Path | None, quiet: bool) -> None:
    """Check the hash chain and the signed head; exit 1 naming the first bad entry."""
    from datetime import UTC, datetime

    with edif_errors():
        log = _open_audit(data_dir)
        report = log.verify()
        entries = [] if quiet or not report.ok else log.entries()
    if not report.ok:
        for problem in report.problems:
            click.echo(f"  entry {problem.seq}: {problem.reason}", err=True)
        raise click.ClickException(report.summary())
    for e in entries:
        when = datetime.fromtimestamp(e.ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        who = "(erased)" if e.erased else (e.pseudonym or "-")
        click.echo(
            f"{e.seq:>6} {when} {e.action:<16} {who:<34} {e.model or '-'} "
            f"site={e.site or '-'} in={e.bytes_in} out={e.bytes_out} gpu_s={e.gpu_s:g} "
            f"{e.outcome or ''}".rstrip()
        )
    click.echo(report.summary())


@audit.command("export")
@_audit_data_dir
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json")
@click.option("--since", default=None, help="From this date/time (ISO) or duration ago (7d).")
@click.option("--until", default=None, help="Before this date/time (ISO) or duration ago.")
@click.option("--user", default=None, help="Only this data subject's entries (GDPR export).")
def audit_export(
    data_dir: Path | None, fmt: str, since: str | None, until: str | None, user: str | None
) -> None:
    """Print entries and accounting rows as JSON or CSV on stdout."""
    from broker.audit import AuditFilter
    from broker.audit.export import to_csv, to_json

    window = AuditFilter(since=_when(since), until=_when(until))
    with edif_errors():
        log = _open_audit(data_dir)
        if user is not None:
            found = log.export_subject(user, window)
            entries, rows, pseudonyms = found.entries, found.accounting, found.pseudonyms
        else:
            entries, rows, pseudonyms = log.entries(window), log.accounting(), None
    click.echo(
        to_json(entries, rows, pseudonyms) if fmt == "json" else to_csv(entries, rows), nl=False
    )


@audit.command("erase")
@_audit_data_dir
@click.option("--user", required=True, help="The data subject (their user id, e.g. an e-mail).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def audit_erase(data_dir: Path | None, user: str, yes: bool) -> None:
    """Unlink a person from their audit entries (GDPR erasure); the log stays verifiable."""
    if not yes:
        click.confirm(f"Erase {user}'s link to every audit entry, for good?", abort=True)
    with edif_errors():
        report = _open_audit(data_dir).erase(user)
    click.echo(report.model_dump_json(indent=2))


@audit.command("compact")
@_audit_data_dir
@click.option("--older-than", type=Duration(), default=None, help="Default: the retention.")
def audit_compact(data_dir: Path | None, older_than: int | None) -> None:
    """Turn expired detailed entries into accounting rows now (the broker does it hourly)."""
    from broker.config import BrokerSettings

    retention = older_than or BrokerSettings().audit_detailed_retention_days * 86400
    with edif_errors():
        entry = _open_audit(data_dir).compact(retention)
    click.echo(json.dumps(entry.data if entry else {"removed": 0}, indent=2))


@audit.command("rotate-key")
def audit_rotate_key() -> None:
    """Start a new audit pseudonym key; new entries use it (old keys stay for export/erasure)."""
    from broker.audit import AuditKeyring
    from broker.config import BrokerSettings

    settings = BrokerSettings()
    with edif_errors():
        keys = settings.keys_dir or KeyStore.default().directory
        click.echo(AuditKeyring(keys).rotate())


from edif.cli_keys import key as _key_commands  # noqa: E402 - it imports this module's helpers

main.add_command(_key_commands)
