"""``fedgov roster ...``: the federation roster that secure aggregation checks keys against.

The roster authority (not the coordinator) keeps its key apart, adds each municipality's
identity key (``identity-key.pub`` from ``fedgov node init``), signs, and hands the roster and
its fingerprint to the nodes, which pin both in their policy (``[secure_aggregation]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fedgov.cli.console import console, new_typer
from fedgov.errors import RosterError

__all__ = ["roster_app"]

roster_app = new_typer("The federation roster for secure aggregation: init, add, sign, show.")


@roster_app.command("init")
def roster_init(
    roster: Annotated[Path, typer.Argument(help="The roster file to create, e.g. roster.json")],
    federation: Annotated[str, typer.Option("--federation", help="The federation's name")],
    key: Annotated[Path | None, typer.Option("--key", help="The authority's key (default: roster-authority.key beside the roster); created when missing")] = None,
) -> None:
    """Create an empty roster and, when missing, the roster authority's key (mode 0600)."""
    from fedgov.privacy.roster import (  # lazy: the fedgov.privacy package loads numpy (fedgov --help)
        AUTHORITY_KEY, Roster, _b64, fingerprint, load_private_key, new_authority, public_key_of, save_roster_file,
    )

    if roster.exists():
        raise RosterError(f"{roster} exists; a roster is never overwritten", str(roster))
    key_path = key or roster.parent / AUTHORITY_KEY
    pub = public_key_of(load_private_key(key_path)) if key_path.exists() else new_authority(key_path)
    save_roster_file(Roster(federation=federation, authority=_b64(pub)), roster)
    console.print(f"Roster {roster} for federation {federation}; authority key {key_path}")
    console.print(f"Authority fingerprint (for each node's policy, \\[secure_aggregation] authority_key): {fingerprint(pub)}")


@roster_app.command("add")
def roster_add(
    roster: Annotated[Path, typer.Argument(help="The roster file")],
    name: Annotated[str, typer.Argument(help="The member's name (its policy's node name), e.g. GM0363")],
    public_key: Annotated[Path, typer.Argument(help="The member's identity-key.pub (from its node directory)")],
) -> None:
    """Add a member (or replace its key); the roster must be signed again."""
    from fedgov.privacy.roster import fingerprint, load_roster_file, read_public_key, save_roster_file  # lazy: the fedgov.privacy package loads numpy (fedgov --help)

    pk = read_public_key(public_key)
    save_roster_file(load_roster_file(roster).with_member(name, pk), roster)
    console.print(f"{name}: identity key {fingerprint(pk)} added to {roster}; sign it again ('fedgov roster sign')")


@roster_app.command("sign")
def roster_sign(
    roster: Annotated[Path, typer.Argument(help="The roster file")],
    key: Annotated[Path, typer.Option("--key", help="The roster authority's private key")],
) -> None:
    """Sign the roster with the authority's key."""
    from fedgov.privacy.roster import load_private_key, load_roster_file, save_roster_file  # lazy: the fedgov.privacy package loads numpy (fedgov --help)

    r = load_roster_file(roster).signed(load_private_key(key))
    save_roster_file(r, roster)
    console.print(f"{roster}: signed ({len(r.members)} members, digest {r.digest.hex()[:16]})")


@roster_app.command("show")
def roster_show(
    roster: Annotated[Path, typer.Argument(help="The roster file")],
    authority: Annotated[str | None, typer.Option("--authority", help="Check it against this authority (fingerprint or base64 key)")] = None,
    registry: Annotated[
        Path | None,
        typer.Option("--registry", help="An organisation registry (CSV: code,name,...): show each member's organisation; 'cbs': the CBS municipalities"),
    ] = None,
) -> None:
    """The members and their fingerprints; with ``--authority``, whether the roster checks out."""
    from fedgov.privacy.roster import _unb64, fingerprint, load_roster_file  # lazy: the fedgov.privacy package loads numpy (fedgov --help)

    r = load_roster_file(roster)
    t = Table(title=f"Roster of {r.federation}")
    t.add_column("name")
    names: dict[str, str] | None = None
    if registry is not None:
        from fedgov.config.registry import default_registry, load_registry  # lazy: the registry (fedgov --help)

        reg = default_registry() if str(registry) == "cbs" else load_registry(registry)
        names = {m.name: reg.name(m.name) if m.name in reg else "(not in the registry)" for m in r.members}
        t.add_column("organisation")
    t.add_column("identity key SHA-256")
    for m in r.members:
        if names is not None:
            t.add_row(m.name, escape(names[m.name]), m.fingerprint)
        else:
            t.add_row(m.name, m.fingerprint)
    console.print(t)
    console.print(f"Authority fingerprint: {fingerprint(_unb64(r.authority))}")
    console.print(f"Signed: {'yes' if r.signature else 'no'}; digest {r.digest.hex()}")
    if authority is not None:
        r.check(authority)
        console.print("The roster's signature verifies under that authority.")
