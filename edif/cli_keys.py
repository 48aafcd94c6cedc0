"""`edif key rotate|list|retire`: the broker's signing keys over their life.

All three work on the key store the broker uses (`EDIF_BROKER_KEYS_DIR`, default
`$EDIF_HOME/keys`) under its lock, so they are safe while the broker runs; the broker and the
site agents pick a change up on their next request. `rotate` makes a new signing key and gives
the previous ones the grace period (`--grace`, default the broker's `EDIF_BROKER_KEY_GRACE_S`)
to keep verifying the tokens they signed; `retire` ends one key at once (a leaked key); `list`
shows every key with its state. The new kid goes to stdout, notes to stderr.
"""

from __future__ import annotations

import time

import click

from auth.keys import KeyStore
from auth.rotation import KeyState
from edif.cli import Duration, edif_errors


def _store() -> KeyStore:
    from broker.config import BrokerSettings

    keys_dir = BrokerSettings().keys_dir
    return KeyStore(keys_dir) if keys_dir else KeyStore.default()


def _default_grace() -> int:
    from broker.config import BrokerSettings

    return int(BrokerSettings().key_grace_s)


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


@click.group("key")
def key() -> None:
    """Rotate, list and retire the keys that sign eDIF tokens."""


@key.command("rotate")
@click.option(
    "--grace",
    type=Duration(),
    default=None,
    help="How long the previous keys keep verifying (default: EDIF_BROKER_KEY_GRACE_S, 7d).",
)
def rotate(grace: int | None) -> None:
    """Make a new signing key and print its kid; older keys retire after the grace period."""
    grace_s = _default_grace() if grace is None else grace
    with edif_errors():
        store = _store()
        store.signing_key()  # a fresh store: rotate from its first key, not from nothing
        kid = store.rotate(grace_s)
    click.echo(kid)
    click.echo(f"new tokens are signed by {kid}; previous keys verify for {grace_s}s", err=True)


@key.command("list")
def list_keys() -> None:
    """Every key: kid, created, state (active, grace, retired) and when it retires (UTC)."""
    with edif_errors():
        store = _store()
        records = store.records()
        states = store.states()
        untracked = store.untracked()
    click.echo(f"{'kid':<16}  {'created (UTC)':<19}  {'state':<9}  retires (UTC)")
    order = sorted(records.values(), key=lambda r: (-r.created_at, r.kid))
    for record in order:
        state = states[record.kid]
        retires = _when(record.retire_at) if state != KeyState.ACTIVE else "-"
        click.echo(f"{record.kid:<16}  {_when(record.created_at):<19}  {state.value:<9}  {retires}")
    for kid in untracked:
        click.echo(f"{kid:<16}  {'-':<19}  {'untracked':<9}  (not in keys.json: ignored)")


@key.command("retire")
@click.argument("kid")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def retire(kid: str, yes: bool) -> None:
    """Retire KID now: its tokens are refused at once (a leaked key). Retiring the signing
    key first rotates to a new one."""
    if not yes:
        click.confirm(f"retire key {kid} now? every token it signed stops working", abort=True)
    with edif_errors():
        new_kid = _store().retire(kid, _default_grace())
    click.echo(f"retired {kid}", err=True)
    if new_kid:
        click.echo(f"new tokens are signed by {new_kid}", err=True)
