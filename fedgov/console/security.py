"""Who may use a console, and how: a secret, sessions, forgery protection, TLS off loopback.

The rules every console (node or coordinator) follows:

* **Bound to 127.0.0.1 by default.** Another address needs TLS (:func:`check_binding`): a
  certificate and key the operator gives, or a development certificate from fedgov's own PKI
  helper (:func:`fedgov.deploy.pki.create_dev_pki`).
* **A secret to log in**: a random token printed when the console starts (:func:`new_token`), or
  a password read from a file only its owner can read (:func:`read_password_file`). The secret
  is compared in constant time; failed logins are rate-limited.
* **A session** after login: a random id in a cookie that is ``HttpOnly`` and
  ``SameSite=Strict`` (and ``Secure`` with the ``__Host-`` prefix under TLS), kept in this
  process only, expiring after a while idle.
* **Every state-changing form carries the session's CSRF token** (compared in constant time),
  and a request whose ``Origin`` is another site is refused.
* **Who acted** is ``console:<secret id>`` (the first hex digits of the secret's SHA-256, never
  the secret), plus the name given at login: the node's audit log records it.

Pure Python with no web framework: :mod:`fedgov.console.web` puts it to work.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedgov.errors import ConfigError, Problem

__all__ = [
    "Guard",
    "Session",
    "check_binding",
    "is_loopback",
    "new_token",
    "read_password_file",
]

_NAME = re.compile(r"[^A-Za-z0-9 .@_+-]")


def new_token() -> str:
    """A fresh login token: 32 random bytes (256 bits) from the OS's CSPRNG, URL-safe."""
    return secrets.token_urlsafe(32)


def read_password_file(path: Path) -> str:
    """The password in ``path`` (its first line): a :class:`ConfigError` naming the file when it
    is missing, readable or writable by others than its owner, not owned by this user, or holds
    a password shorter than 12 characters."""
    p = Path(path)
    try:
        # one open file for the checks and the read (no name looked up twice); a FIFO does not block
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ConfigError(f"password file {p} cannot be read", [Problem(str(p), "", f"{exc.strerror or exc}")]) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"password file {p} is not a regular file", [Problem(str(p), "", "expected a file")])
        if st.st_mode & 0o077:
            raise ConfigError(
                f"password file {p} is readable or writable by others (mode {stat.S_IMODE(st.st_mode):04o})",
                [Problem(str(p), "", "expected mode 0600 or 0400: chmod 600 " + str(p))],
            )
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            raise ConfigError(f"password file {p} belongs to another user", [Problem(str(p), "", "expected a file of this user")])
        with os.fdopen(os.dup(fd), "rb") as fh:
            raw = fh.read(64 * 1024)
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"password file {p} cannot be read", [Problem(str(p), "", str(exc))]) from None
    password = text.splitlines()[0].strip() if text.strip() else ""
    if len(password) < 12:
        raise ConfigError(
            f"password file {p} holds no password of at least 12 characters",
            [Problem(str(p), "line 1", "expected a password of at least 12 characters")],
        )
    return password


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, *, tls: bool) -> None:
    """Refuse to serve on an address other machines can reach without TLS (:class:`ConfigError`)."""
    if not is_loopback(host) and not tls:
        raise ConfigError(
            f"the console would listen on {host}, which other machines can reach, without TLS",
            [Problem("--host", host, "expected 127.0.0.1 (the default), or TLS: --tls-cert and --tls-key, or --tls-dev DIR")],
        )


@dataclass
class Session:
    """One logged-in browser."""

    sid: str
    csrf: str
    who: str
    created: float
    last_seen: float


@dataclass
class Guard:
    """The secret, the sessions and the login rate limit of one console process.

    ``secret`` is the token or password; ``secure`` says the console is served over TLS (the
    cookie is then ``Secure`` and ``__Host-`` prefixed). ``idle_s`` ends a session unused for
    that long; at most ``max_failures`` failed logins are accepted per ``failure_window_s``.
    """

    secret: str
    secure: bool = False
    idle_s: float = 8 * 3600.0
    max_failures: int = 10
    failure_window_s: float = 60.0
    clock: Callable[[], float] = field(default_factory=lambda: time.monotonic, repr=False)
    _sessions: dict[str, Session] = field(default_factory=dict, repr=False)
    _failures: deque[float] = field(default_factory=deque, repr=False)

    def __post_init__(self) -> None:
        if not self.secret:
            raise ValueError("a console needs a secret")
        self._digest = hashlib.sha256(self.secret.encode("utf-8")).digest()

    def _now(self) -> float:
        return float(self.clock())

    @property
    def secret_id(self) -> str:
        """Names the secret in the audit log without revealing it: 8 hex digits of its SHA-256."""
        return self._digest.hex()[:8]

    @property
    def cookie_name(self) -> str:
        """Per console (cookies are not kept apart by port): ``fedgov-console-<secret id>``,
        ``__Host-`` prefixed under TLS."""
        return ("__Host-" if self.secure else "") + f"fedgov-console-{self.secret_id}"

    def throttled(self) -> bool:
        """Too many failed logins lately: refuse the next one without checking it."""
        now = self._now()
        while self._failures and now - self._failures[0] > self.failure_window_s:
            self._failures.popleft()
        return len(self._failures) >= self.max_failures

    def login(self, given: str, name: str = "") -> Session | None:
        """A new session if ``given`` is the secret (constant-time), else None (counted)."""
        ok = hmac.compare_digest(hashlib.sha256(given.encode("utf-8")).digest(), self._digest)
        now = self._now()
        if not ok:
            self._failures.append(now)
            return None
        clean = _NAME.sub("", name)[:40].strip()
        who = f"console:{self.secret_id}" + (f":{clean}" if clean else "")
        s = Session(sid=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), who=who, created=now, last_seen=now)
        self._sessions[s.sid] = s
        return s

    def session(self, sid: str | None) -> Session | None:
        """The live session with id ``sid``; an expired one is forgotten."""
        if not sid:
            return None
        s = self._sessions.get(sid)
        if s is None:
            return None
        now = self._now()
        if now - s.last_seen > self.idle_s:
            self._sessions.pop(sid, None)
            return None
        s.last_seen = now
        return s

    def logout(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    @staticmethod
    def csrf_ok(session: Session, given: str | None) -> bool:
        """Whether a form's CSRF token is the session's (constant-time)."""
        return bool(given) and hmac.compare_digest(session.csrf.encode(), str(given).encode())
