"""The federation roster: which nodes may take part in secure aggregation, and their identity keys.

Secure aggregation against a coordinator that deviates (``docs/threat-model.md``) needs keys the
coordinator cannot substitute and members it cannot add. Each node holds a long-term Ed25519
identity key (``identity-key`` in its node directory, mode 0600; ``identity-key.pub`` beside it)
and signs every round's public keys with it. A roster authority, whose key is not the
coordinator's, signs the roster: the members' names, their identity public keys and the keys'
SHA-256 fingerprints. Each node pins the authority in its policy::

    [secure_aggregation]
    roster = "roster.json"           # relative to the policy file
    authority_key = "<SHA-256 fingerprint (64 hex) or base64 public key of the authority>"

and checks every peer's round keys against the roster before it sends a share to anyone.

The file::

    {"federation": "demo-12", "authority": "<base64 Ed25519 public key>",
     "members": [{"name": "GM0363", "public_key": "<base64>", "fingerprint": "<sha256 hex>"}, ...],
     "signature": "<base64 Ed25519 signature over the canonical JSON of the rest>"}

Everything here is pure but the file helpers (``*_file``, :func:`ensure_identity`,
:func:`new_authority`). The CLI is ``fedgov roster init|add|sign|show`` (:mod:`fedgov.cli.roster`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import functools
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fedgov.errors import RosterError

__all__ = [
    "IDENTITY_KEY",
    "IDENTITY_PUB",
    "AUTHORITY_KEY",
    "RosterError",
    "Member",
    "Roster",
    "fingerprint",
    "sign",
    "verify",
    "keys_message",
    "consistency_message",
    "new_authority",
    "ensure_identity",
    "load_private_key",
    "public_key_of",
    "load_roster_file",
    "save_roster_file",
    "load_pinned",
    "make_roster",
    "federation_roster",
    "read_public_key",
    "authority_matches",
]

IDENTITY_KEY = "identity-key"
IDENTITY_PUB = "identity-key.pub"
AUTHORITY_KEY = "roster-authority.key"


def fingerprint(public_key: bytes) -> str:
    """The SHA-256 of a raw 32-byte Ed25519 public key, as 64 lower-case hex digits."""
    return hashlib.sha256(public_key).hexdigest()


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    try:
        return base64.b64decode(s.encode(), validate=True)
    except (binascii.Error, ValueError):
        raise RosterError("a key or signature is not base64") from None


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class Member(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    public_key: str
    fingerprint: str

    @property
    def key(self) -> bytes:
        return _unb64(self.public_key)


class Roster(BaseModel):
    """A federation roster (see the module's text); :meth:`check` before any use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    federation: str = Field(min_length=1)
    authority: str
    members: list[Member] = Field(default_factory=list)
    signature: str = ""

    def body(self) -> bytes:
        """The signed bytes: canonical JSON of everything but the signature (members by name)."""
        return self._body

    @functools.cached_property
    def _body(self) -> bytes:
        # The model is frozen: computed once per object (a copy starts afresh: model_copy).
        return _canonical({
            "federation": self.federation, "authority": self.authority,
            "members": [m.model_dump() for m in sorted(self.members, key=lambda m: m.name)],
        })

    @functools.cached_property
    def digest(self) -> bytes:
        """SHA-256 of :meth:`body`: names this roster (it seeds the SecAgg+ graph)."""
        return hashlib.sha256(b"fedgov-roster|" + self.body()).digest()

    @functools.cached_property
    def _keys(self) -> dict[str, bytes]:
        keys: dict[str, bytes] = {}
        for m in self.members:
            keys.setdefault(m.name, m.key)  # the first, as a scan would find it (check refuses a name twice)
        return keys

    def key_of(self, name: str) -> bytes | None:
        return self._keys.get(name)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Roster:
        """A copy whose body, digest and key index are computed afresh (never the original's)."""
        copy = super().model_copy(update=update, deep=deep)
        for cached in ("_body", "digest", "_keys"):
            copy.__dict__.pop(cached, None)
        return copy

    def check(self, pinned_authority: str) -> Roster:
        """This roster if the authority is the pinned one and its signature holds, names and keys
        are unique and each fingerprint is its key's; else :class:`RosterError`."""
        auth = _unb64(self.authority)
        if not authority_matches(auth, pinned_authority):
            raise RosterError("the roster is signed by another authority than the one this node's policy pins")
        if not self.signature or not verify(auth, _unb64(self.signature), self.body()):
            raise RosterError("the roster's signature does not verify under its authority's key")
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise RosterError("the roster names a member twice")
        keys = [m.key for m in self.members]
        if len(set(keys)) != len(keys) or any(len(k) != 32 for k in keys):
            raise RosterError("the roster holds a key twice, or a key that is not an Ed25519 public key")
        for m in self.members:
            if fingerprint(m.key) != m.fingerprint:
                raise RosterError(f"member {m.name}: the fingerprint is not its key's")
        return self

    def with_member(self, name: str, public_key: bytes) -> Roster:
        """A copy with ``name`` (added or its key replaced), unsigned."""
        others = [m for m in self.members if m.name != name]
        if any(m.key == public_key for m in others):
            raise RosterError(f"the key of {name} is already another member's")
        m = Member(name=name, public_key=_b64(public_key), fingerprint=fingerprint(public_key))
        return self.model_copy(update={"members": sorted([*others, m], key=lambda x: x.name), "signature": ""})

    def signed(self, authority_key: Any) -> Roster:
        """A copy signed with the authority's private key (an Ed25519 private key object)."""
        from cryptography.hazmat.primitives import serialization

        pub = authority_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if _b64(pub) != self.authority:
            raise RosterError("this key is not the roster's authority")
        return self.model_copy(update={"signature": _b64(sign(authority_key, self.body()))})


def authority_matches(public_key: bytes, pinned: str) -> bool:
    """Whether ``pinned`` (a 64-hex fingerprint or a base64 public key) names ``public_key``."""
    p = pinned.strip()
    if len(p) == 64 and all(c in "0123456789abcdefABCDEF" for c in p):
        return fingerprint(public_key) == p.lower()
    try:
        return base64.b64decode(p.encode(), validate=True) == public_key
    except (binascii.Error, ValueError):
        return False


# ---- signatures ----------------------------------------------------------------------------


def sign(private_key: Any, message: bytes) -> bytes:
    return bytes(private_key.sign(message))


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature of ``message``.

    A pure function of its three arguments, so its answers are remembered in this process
    (at most 65,536): where one process serves many nodes (a simulation's workers, each
    running hundreds of virtual nodes), every node of a round checks the same round keys, and
    each signature is then verified once per process instead of once per node."""
    if len(public_key) != 32 or len(signature) != 64:  # not Ed25519: never verified, never remembered
        return False
    return _verify(bytes(public_key), bytes(signature), bytes(message))


@functools.lru_cache(maxsize=1 << 16)
def _verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _msg(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big") + p)
    return h.digest()


def keys_message(key: str, round: int, node_id: int, name: str, roster_digest: bytes, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a node signs in the keys stage: the task or query key, the round, its Flower node
    id, its roster name, the roster and both public keys of the round."""
    return _msg(b"fedgov-secagg-keys-v1", key.encode(), str(round).encode(), str(node_id).encode(), name.encode(),
                roster_digest, c_pk, s_pk)


def consistency_message(key: str, round: int, survivors: list[int]) -> bytes:
    """What a survivor signs in the consistency stage: the key, the round, the sorted survivors."""
    return _msg(b"fedgov-secagg-consistency-v1", key.encode(), str(round).encode(),
                ",".join(str(n) for n in sorted(survivors)).encode())


# ---- files -----------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _new_key_file(path: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return public_key_of(key)


def public_key_of(private_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def load_private_key(path: Path | str) -> Any:
    """An Ed25519 private key from a PEM file (a node's identity key, the roster authority's)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    p = Path(path)
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise RosterError(f"cannot read the key {p}: {type(exc).__name__}", str(p)) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise RosterError(f"{p} is not an Ed25519 private key", str(p))
    return key


def new_authority(path: Path | str) -> bytes:
    """Create a roster authority's key (mode 0600; never overwritten); its public key."""
    p = Path(path)
    if p.exists():
        raise RosterError(f"{p} exists; an authority key is never overwritten", str(p))
    p.parent.mkdir(parents=True, exist_ok=True)
    return _new_key_file(p)


def ensure_identity(node_dir: Path | str, name: str = "") -> bytes:
    """The node's identity public key, created (``identity-key``, mode 0600) when missing."""
    d = Path(node_dir)
    key_path = d / IDENTITY_KEY
    if key_path.exists():
        return public_key_of(load_private_key(key_path))
    d.mkdir(parents=True, exist_ok=True)
    pub = _new_key_file(key_path)
    (d / IDENTITY_PUB).write_text(f"{_b64(pub)} {name}\n".rstrip() + "\n", encoding="utf-8")
    return pub


def read_public_key(path: Path | str) -> bytes:
    """A public key file: ``identity-key.pub`` (base64, then an optional name) or a private key."""
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RosterError(f"cannot read {p}: {type(exc).__name__}", str(p)) from None
    if "PRIVATE KEY" in text:
        return public_key_of(load_private_key(p))
    key = _unb64(text.split()[0]) if text.split() else b""
    if len(key) != 32:
        raise RosterError(f"{p} holds no Ed25519 public key", str(p))
    return key


def load_roster_file(path: Path | str) -> Roster:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise RosterError(f"cannot read the roster {p}: {type(exc).__name__}", str(p)) from None
    return _parse_roster(raw, p)


def _parse_roster(raw: bytes, p: Path) -> Roster:
    try:
        return Roster.model_validate_json(raw.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and pydantic's ValidationError are ValueErrors
        raise RosterError(f"the roster {p} is not a roster file: {str(exc).splitlines()[0]}", str(p)) from None


def save_roster_file(roster: Roster, path: Path | str) -> None:
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(roster.model_dump_json(indent=2) + "\n", encoding="utf-8")
    tmp.replace(p)


def load_pinned(path: Path | str, authority_key: str) -> Roster:
    """The roster at ``path``, checked against the pinned authority (:meth:`Roster.check`).

    A roster's bytes that were checked once against an authority are not checked again in this
    process (a node reads its roster at every secure-aggregation message): the file is read
    each time, and any other bytes are checked anew."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise RosterError(f"cannot read the roster {p}: {type(exc).__name__}", str(p)) from None
    key = (raw, authority_key)
    hit = _CHECKED.get(key)
    if hit is None:
        hit = _CHECKED[key] = _parse_roster(raw, p).check(authority_key)  # these very bytes
        while len(_CHECKED) > 16:
            _CHECKED.pop(next(iter(_CHECKED)))
    return hit


_CHECKED: dict[tuple[bytes, str], Roster] = {}


def make_roster(federation: str, members: dict[str, bytes], authority_key: Any) -> Roster:
    """A signed roster of ``members`` (name -> identity public key)."""
    r = Roster(federation=federation, authority=_b64(public_key_of(authority_key)))
    for name, pk in sorted(members.items()):
        r = r.with_member(name, pk)
    return r.signed(authority_key)


def federation_roster(directory: Path | str, federation: str, node_dirs: dict[str, Path]) -> tuple[Path, str]:
    """For simulations and ``fedgov local-federation up``: a roster authority in ``directory``
    (created once, kept), each node's identity key (created when missing) and the roster of
    them, signed. Returns the roster's path and the authority's fingerprint, for the policies.
    A deployment runs ``fedgov roster`` instead, with the authority's key kept apart."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    auth_path = d / AUTHORITY_KEY
    if not auth_path.exists():
        new_authority(auth_path)
    authority = load_private_key(auth_path)
    roster_path = d / "roster.json"
    if roster_path.exists():
        roster = load_roster_file(roster_path).check(fingerprint(public_key_of(authority)))
    else:
        roster = Roster(federation=federation, authority=_b64(public_key_of(authority)))
    for name, node_dir in sorted(node_dirs.items()):
        pk = ensure_identity(node_dir, name)
        if roster.key_of(name) != pk:
            roster = roster.with_member(name, pk)
    if not roster.signature:
        roster = roster.signed(authority)
        save_roster_file(roster, roster_path)
    return roster_path.resolve(), fingerprint(public_key_of(authority))
