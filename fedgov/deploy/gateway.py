"""The coordinator's public face: a TLS reverse proxy that serves only the Fleet API.

Flower 1.42's SuperLink serves the Fleet API (``/v1/fleet/*``, what SuperNodes use), the
Control API (``/v1/control/*``), the Runtime API and ``/health`` on one HTTPS port, and the
Control API has no authentication in open-source Flower: whoever reaches that port can start
runs, stop them and read their results. A coordinator must still be reachable by its nodes.

So the SuperLink binds ``127.0.0.1:<internal port>`` (TLS, its own certificate), and this
gateway listens on the public host and port with TLS. It forwards ``/v1/fleet/...`` (GET and
POST) and ``/health`` (GET and HEAD) to the SuperLink over HTTPS, verifying the SuperLink's
certificate against the CA file, and answers everything else with 403 and a short JSON body.

* Paths are checked on the raw request target, before any decoding: only the characters
  ``A-Z a-z 0-9 - . _ ~ /`` are accepted, and ``..``, ``//``, ``/./``, any percent-encoding
  (``%2f``, ``%2e``, ...) and backslashes are refused, so no spelling reaches
  ``/v1/control`` through the SuperLink's own path handling. The raw path is forwarded as it
  was checked.
* Request headers go upstream unchanged except hop-by-hop ones, ``host``, ``content-length``
  and ``expect``; the body is read whole and forwarded unchanged. SuperNode authentication
  signs headers (``flwr-timestamp``, ``flwr-signature-bin``, ``flwr-public-key-bin``), so it
  keeps working through the gateway.
* The SuperLink's status, headers (less hop-by-hop ones; ``content-length`` recomputed) and
  body come back unchanged; a ``content-encoding`` body is passed through still encoded.
* SuperLink unreachable: 502 (a timeout waiting for its answer: 504) with a JSON ``detail``;
  no traceback reaches the client and no body is ever logged.

Run it as ``python -m fedgov.deploy.gateway --host 0.0.0.0 --port 9092 --upstream
https://127.0.0.1:9093 --ca-cert pki/ca.crt --certfile pki/server.pem --keyfile pki/server.key``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import ssl
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

__all__ = ["ALLOWED_EXACT", "ALLOWED_PREFIXES", "is_allowed_path", "main", "make_app", "serve"]

log = logging.getLogger(__name__)

ALLOWED_PREFIXES: tuple[str, ...] = ("/v1/fleet/",)
"""Path prefixes forwarded to the SuperLink (methods: :data:`PREFIX_METHODS`)."""
ALLOWED_EXACT: tuple[str, ...] = ("/health",)
"""Exact paths forwarded to the SuperLink (methods: :data:`EXACT_METHODS`)."""
PREFIX_METHODS: tuple[str, ...] = ("GET", "POST")
EXACT_METHODS: tuple[str, ...] = ("GET", "HEAD")

FORBIDDEN_DETAIL = "fedgov gateway: only the Fleet API is served on this port; the Control API is local to the coordinator"
UNREACHABLE_DETAIL = "fedgov gateway: the coordinator's SuperLink is unreachable"
TIMEOUT_DETAIL = "fedgov gateway: the coordinator's SuperLink did not answer in time"

# Plain path characters only (RFC 3986 unreserved + "/"): no "%", "\\", ";", "?", "#", ":".
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._~/-]*")

# RFC 9110 7.6.1 hop-by-hop headers, plus ones the proxy sets itself.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
    }
)
_DROP_REQUEST = _HOP_BY_HOP | {b"host", b"content-length", b"expect"}
_DROP_RESPONSE = _HOP_BY_HOP | {b"content-length"}


def is_allowed_path(raw_path: str) -> bool:
    """Whether the raw (undecoded) request path may be forwarded to the SuperLink."""
    if not _SAFE_PATH.fullmatch(raw_path):
        return False  # percent-encoding, backslashes, odd characters, relative targets
    if "//" in raw_path or ".." in raw_path or "/./" in raw_path or raw_path.endswith("/."):
        return False
    if raw_path in ALLOWED_EXACT:
        return True
    return any(raw_path.startswith(prefix) and len(raw_path) > len(prefix) for prefix in ALLOWED_PREFIXES)


def _raw_path(request: Request) -> str:
    raw = request.scope.get("raw_path")
    if not isinstance(raw, bytes | bytearray):
        path: str = request.scope["path"]  # an ASGI scope's "path" is a str
        return path
    return bytes(raw).split(b"?", 1)[0].decode("latin-1")


def _connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names a ``Connection`` header marks as hop-by-hop."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def _filter_headers(headers: Sequence[tuple[bytes, bytes]], drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    extra = _connection_tokens(headers)
    return [(name, value) for name, value in headers if name.lower() not in drop and name.lower() not in extra]


def _detail(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _ssl_context(ca_cert: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def make_app(upstream: str, ca_cert: Path, *, timeout: float = 120.0) -> Starlette:
    """The gateway as an ASGI app forwarding allowed requests to ``upstream`` (``https://host:port``).

    The SuperLink's certificate is verified against ``ca_cert``. One HTTP client is opened in
    the app's lifespan and closed on shutdown.
    """
    base = httpx.URL(upstream)
    if base.scheme != "https" or not base.host:
        raise ValueError(f"upstream must be an https:// URL, got {upstream!r}")
    if base.raw_path not in (b"", b"/") or base.query or base.fragment:
        raise ValueError(f"upstream must be scheme://host:port only, got {upstream!r}")
    ctx = _ssl_context(Path(ca_cert))  # fail now, not on the first request, if the CA is unreadable
    holder: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(verify=ctx, timeout=timeout, trust_env=False, follow_redirects=False) as client:
            holder["client"] = client
            try:
                yield
            finally:
                holder.pop("client", None)

    async def proxy(request: Request) -> Response:
        path = _raw_path(request)
        if not is_allowed_path(path) or request.scope["path"] != path:
            return _detail(403, FORBIDDEN_DETAIL)
        methods = EXACT_METHODS if path in ALLOWED_EXACT else PREFIX_METHODS
        method = request.method.upper()
        if method not in methods:
            return _detail(405, f"fedgov gateway: method {method} not allowed here", {"Allow": ", ".join(methods)})
        client = holder.get("client")
        if client is None:  # the app is served without its lifespan
            return _detail(503, "fedgov gateway: not started")

        body = await request.body()
        query: bytes = request.scope.get("query_string", b"")
        target = path.encode("ascii") + (b"?" + query if query else b"")
        headers = _filter_headers(request.headers.raw, _DROP_REQUEST)
        upstream_request = client.build_request(
            method, base.copy_with(raw_path=target), headers=headers, content=body if body or method == "POST" else None
        )
        try:
            upstream_response = await client.send(upstream_request, stream=True)
            try:
                payload = b"".join([chunk async for chunk in upstream_response.aiter_raw()])
            finally:
                await upstream_response.aclose()
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
                log.warning("upstream %s unreachable: %s", upstream, type(exc).__name__)
                return _detail(502, UNREACHABLE_DETAIL)
            log.warning("upstream %s timed out: %s", upstream, type(exc).__name__)
            return _detail(504, TIMEOUT_DETAIL)
        except httpx.HTTPError as exc:
            log.warning("upstream %s failed: %s: %s", upstream, type(exc).__name__, exc)
            return _detail(502, UNREACHABLE_DETAIL)

        status = upstream_response.status_code
        raw_headers = upstream_response.headers.raw
        out_headers = _filter_headers(raw_headers, _DROP_RESPONSE)
        if method == "HEAD":
            # No body comes back for HEAD: keep the length the SuperLink announced.
            out_headers += [(n, v) for n, v in raw_headers if n.lower() == b"content-length"]
            payload = b""
        elif not (status < 200 or status in (204, 304)):
            out_headers.append((b"content-length", str(len(payload)).encode("ascii")))
        response = Response(content=payload, status_code=status)
        response.raw_headers = out_headers
        return response

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        response = await proxy(Request(scope, receive))
        await response(scope, receive, send)

    # No routes: every HTTP request, whatever its method or target, reaches ``endpoint``,
    # which decides alone what is forwarded.
    app = Starlette(routes=[], lifespan=lifespan)
    app.router.default = endpoint
    return app


def serve(host: str, port: int, upstream: str, ca_cert: Path, certfile: Path, keyfile: Path) -> None:
    """Run the gateway with TLS on ``host:port`` until SIGINT/SIGTERM (uvicorn's graceful stop)."""
    app = make_app(upstream, ca_cert)
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=str(certfile),
        ssl_keyfile=str(keyfile),
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        server_header=False,  # the SuperLink's own server/date headers are passed through
        date_header=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m fedgov.deploy.gateway``: serve the Fleet API of a loopback SuperLink publicly."""
    parser = argparse.ArgumentParser(
        prog="python -m fedgov.deploy.gateway",
        description="TLS reverse proxy exposing only a SuperLink's Fleet API (/v1/fleet/*) and /health.",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--upstream", required=True, help="the SuperLink, e.g. https://127.0.0.1:9093")
    parser.add_argument("--ca-cert", type=Path, required=True, help="CA that signed the SuperLink's certificate")
    parser.add_argument("--certfile", type=Path, required=True, help="the gateway's TLS certificate (PEM)")
    parser.add_argument("--keyfile", type=Path, required=True, help="the gateway's TLS private key (PEM)")
    args = parser.parse_args(argv)
    for label, file in (("--ca-cert", args.ca_cert), ("--certfile", args.certfile), ("--keyfile", args.keyfile)):
        if not file.is_file():
            parser.error(f"{label}: no such file: {file}")
    if not 0 < args.port < 65536:
        parser.error(f"--port: out of range: {args.port}")
    try:
        serve(args.host, args.port, args.upstream, args.ca_cert, args.certfile, args.keyfile)
    except (ValueError, ssl.SSLError, OSError) as exc:
        print(f"fedgov gateway: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
