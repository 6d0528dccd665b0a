"""Which app bundles a node runs: its policy's ``accept.apps`` allow-list.

In deployment the coordinator sends each node a Flower app bundle (FAB: a zip of the
ServerApp and ClientApp code), and the node's SuperNode would install and run whatever it
gets. Flower's own answer, app signatures checked with ``--trusted-entities``, needs a
SuperLink with app verification, which open-source Flower does not have (the SuperNode then
refuses every bundle). fedgov therefore identifies a bundle by the SHA-256 of its bytes,
the hash Flower itself keys bundles by, and a node runs a bundle only if its policy lists it:

- ``"fedgov"``: the bundle this node's own fedgov installation builds. Flower builds bundles
  deterministically (sorted files, fixed timestamps), so a coordinator running the same fedgov
  release submits exactly this bundle, and nothing else matches it.
- a 64-digit hex SHA-256: any other bundle the municipality has reviewed
  (``fedgov app hash DIR`` prints it).
- ``"*"``: any bundle at all, with a warning every time one is run.

The check runs in the ClientApp process before the bundle is installed or imported
(:mod:`fedgov.deploy.clientapp`), so untrusted code never runs; the refusal goes into the
node's audit log and back to the coordinator as ``app-not-trusted``.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from fedgov.errors import ConfigError, Problem
from fedgov.node.policy import NodePolicy
from fedgov.protocol import RefusalCode

__all__ = ["BundleVerdict", "build_bundle", "bundle_hash", "local_bundle_hash", "check_bundle"]


def build_bundle(app: Path | None = None) -> bytes:
    """The app bundle (FAB bytes) Flower builds from ``app`` (default: fedgov's own app)."""
    from flwr.cli.build import build_fab_from_disk

    if app is None:
        from fedgov.launch.simulation import app_dir

        app = app_dir()
    app = Path(app)
    if not (app / "pyproject.toml").is_file():
        raise ConfigError(
            f"{app} is not a Flower app directory",
            [Problem(str(app / "pyproject.toml"), "", "not found; an app directory holds pyproject.toml with [tool.flwr.app]")],
        )
    try:
        return build_fab_from_disk(app)
    except Exception as exc:  # noqa: BLE001 - Flower's build errors name the problem
        raise ConfigError(f"cannot build an app bundle from {app}", [Problem(str(app), "", str(exc))]) from exc


def bundle_hash(fab: bytes) -> str:
    """A bundle's identity: the SHA-256 of its bytes (Flower's ``fab_hash``)."""
    return hashlib.sha256(fab).hexdigest()


@lru_cache(maxsize=1)
def local_bundle_hash() -> str:
    """The hash of the bundle this fedgov installation builds ("fedgov" in a policy)."""
    return bundle_hash(build_bundle())


class BundleVerdict(BaseModel):
    """Whether a node runs a bundle, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trusted: bool
    fab_hash: str
    matched: str | None = None
    warning: str | None = None
    reason: str


def check_bundle(policy: NodePolicy, fab_hash: str, *, local_hash: str | None = None) -> BundleVerdict:
    """Check ``fab_hash`` against the policy's ``accept.apps``.

    ``local_hash`` is the hash that ``"fedgov"`` stands for (default: :func:`local_bundle_hash`;
    computed only when the policy names ``"fedgov"``).
    """
    apps = policy.accept.apps
    if fab_hash in apps:
        return BundleVerdict(trusted=True, fab_hash=fab_hash, matched=fab_hash, reason="bundle listed by hash in accept.apps")
    if "fedgov" in apps:
        own = local_hash if local_hash is not None else local_bundle_hash()
        if fab_hash == own:
            return BundleVerdict(
                trusted=True, fab_hash=fab_hash, matched="fedgov",
                reason="the bundle of this node's own fedgov installation",
            )
    if "*" in apps:
        return BundleVerdict(
            trusted=True, fab_hash=fab_hash, matched="*",
            warning=(
                f"node {policy.node} runs app bundle {fab_hash[:16]}... without checking it: its policy "
                "has accept.apps = \"*\"; list the bundles it may run instead"
            ),
            reason="accept.apps allows any bundle",
        )
    return BundleVerdict(
        trusted=False, fab_hash=fab_hash,
        reason=(
            f"{RefusalCode.APP_NOT_TRUSTED.value}: app bundle sha256 {fab_hash} is not in node {policy.node}'s "
            f"accept.apps ({', '.join(apps)}); this node runs only the bundles its policy lists"
        ),
    )
