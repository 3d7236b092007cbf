"""``modelport keys``: API keys for the tenants of a server started with ``--keys FILE``."""

from __future__ import annotations

import click


@click.group()
def keys() -> None:
    """API keys for tenants (serve --keys FILE)."""


@keys.command("new")
@click.argument("tenant")
def new(tenant: str) -> None:
    """Make a new API key for TENANT: the key (give it to the tenant, once) on stdout, and the
    keys-file entry that holds only its digest on stderr."""
    from modelport.server.tenants import new_key

    key, digest = new_key()
    click.echo(key)
    click.echo(f"# add to the keys file (the key itself is not stored anywhere):\n[tenants.{tenant}]\n"
               f"keys = [\"{digest}\"]\nmodels = [\"*\"]\n# requests_per_s = 20\n# burst = 40\n# max_in_flight = 8\n"
               f"# priority = \"normal\"", err=True)


@keys.command("hash")
@click.argument("key")
def hash_key(key: str) -> None:
    """The digest of an existing KEY, as the keys file holds it."""
    from modelport.server.tenants import digest_of

    click.echo(digest_of(key))
