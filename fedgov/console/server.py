"""Serving a console: uvicorn on the address asked for, with TLS when it is not loopback.

:func:`tls_files` decides the certificate: the operator's own (``--tls-cert``/``--tls-key``),
or a development one made by fedgov's PKI helper (:func:`fedgov.deploy.pki.create_dev_pki`) in
a directory the operator names (``--tls-dev DIR``; its ``ca.crt`` is what a browser must trust;
the CA's key is removed once it has signed the console's certificate, so that the CA a browser
trusts can sign nothing else).
:func:`serve` refuses to listen beyond loopback without one (:func:`~fedgov.console.security.check_binding`).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette

from fedgov.console.security import check_binding
from fedgov.errors import ConfigError, Problem

__all__ = ["Tls", "free_port", "serve", "tls_files"]


@dataclass(frozen=True)
class Tls:
    cert: Path
    key: Path
    ca: Path | None = None  # a development CA's certificate, for the browser to trust


def tls_files(host: str, cert: Path | None, key: Path | None, dev_dir: Path | None) -> Tls | None:
    """The TLS files to serve with, or None for plain HTTP (loopback only)."""
    if (cert is None) != (key is None):
        raise ConfigError("TLS needs both a certificate and its key",
                          [Problem("--tls-cert/--tls-key", "", "give both, or --tls-dev DIR for a development certificate")])
    if cert is not None and key is not None:
        for p in (cert, key):
            if not p.is_file():
                raise ConfigError(f"TLS file {p} not found", [Problem(str(p), "", "not found")])
        return Tls(cert, key)
    if dev_dir is not None:
        from fedgov.deploy.pki import create_dev_pki  # the coordinator's own helper; cryptography

        d = Path(dev_dir)
        if not (d / "server.pem").is_file():
            names = [] if host in ("0.0.0.0", "::") else [host]
            names.append(socket.gethostname())
            create_dev_pki(d, hosts=names)
            # a browser is told to trust ca.crt, for every site: its key, once it has signed
            # this one certificate, is destroyed (to renew, remove the directory)
            (d / "ca.key").unlink(missing_ok=True)
        return Tls(d / "server.pem", d / "server.key", d / "ca.crt")
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve(app: Starlette, *, host: str, port: int, tls: Tls | None) -> None:
    """Serve ``app`` until Ctrl-C (or SIGTERM). Refuses a non-loopback ``host`` without ``tls``."""
    import uvicorn

    check_binding(host, tls=tls is not None)
    uvicorn.run(
        app, host=host, port=port, log_level="warning", access_log=False, server_header=False, proxy_headers=False,
        ssl_certfile=str(tls.cert) if tls else None, ssl_keyfile=str(tls.key) if tls else None,
    )
