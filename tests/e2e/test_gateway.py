"""The Fleet-only gateway (fedgov.deploy.gateway) against a fake SuperLink served over real TLS."""

from __future__ import annotations

import asyncio
import gzip
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import uvicorn

from fedgov.deploy.gateway import FORBIDDEN_DETAIL, is_allowed_path, make_app
from fedgov.deploy.pki import Pki, create_dev_pki
from fedgov.launch.processes import free_port

with warnings.catch_warnings():  # starlette 1.x prefers httpx2 for its TestClient; httpx works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]

Message = dict[str, Any]

AUTH_HEADERS = {
    "flwr-timestamp": "2026-01-01T00:00:00.000000+00:00",
    "flwr-signature-bin": "c2lnbmF0dXJlLWJ5dGVz",
    "flwr-public-key-bin": "cHVibGljLWtleQ",
}

TRICKS = [
    b"/v1/fleet/../control/x",
    b"/v1/fleet/../../v1/control/start-run",
    b"/v1/fleet/%2e%2e/control/x",
    b"/v1/fleet/%2E%2E/control/x",
    b"/v1/fleet%2f..%2fcontrol/x",
    b"/v1/fleet/..%2Fcontrol/x",
    b"/v1/fleet/%2fcontrol",
    b"/v1/fleet//x",
    b"/v1/fleet/./x",
    b"/v1/fleet/.",
    b"/v1/fleet/x\\..\\..\\control\\x",
    b"/v1/fleet/%76",
    b"/v1/fleet/x;/../../control/x",
    b"/v1/fleet/x/..",
]


@dataclass
class Seen:
    method: str
    raw_path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v.decode("latin-1") for k, v in self.headers if k.decode("latin-1").lower() == name]


@dataclass
class FakeSuperLink:
    """An ASGI app standing in for the SuperLink; it records every request that reaches it."""

    seen: list[Seen] = field(default_factory=list)

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append(Seen(scope["method"], scope["raw_path"], scope["query_string"], list(scope["headers"]), body))
        path: str = scope["path"]
        headers: list[tuple[bytes, bytes]] = []
        if path == "/health":
            status, payload = 200, b'{"status":"ok"}'
            headers.append((b"content-type", b"application/json"))
        elif path == "/v1/fleet/gzip":
            status, payload = 200, gzip.compress(b"compressed payload")
            headers.append((b"content-encoding", b"gzip"))
        elif path == "/v1/fleet/missing":
            status, payload = 404, b"no such route"
        elif path == "/v1/fleet/slow":
            await asyncio.sleep(1.5)
            status, payload = 200, b"late"
        elif path.startswith("/v1/fleet/"):
            status, payload = 202, b"echo:" + body
            headers += [
                (b"content-type", b"application/protobuf"),
                (b"x-upstream", b"fake-superlink"),
                (b"set-cookie", b"a=1"),
                (b"set-cookie", b"b=2"),
            ]
        else:
            status, payload = 200, b"CONTROL API REACHED"
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


@dataclass
class Upstream:
    url: str
    pki: Pki
    app: FakeSuperLink


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return create_dev_pki(tmp_path_factory.mktemp("pki"), hosts=("127.0.0.1",))


@pytest.fixture(scope="module")
def upstream_server(pki: Pki) -> Iterator[Upstream]:
    app = FakeSuperLink()
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, ssl_certfile=str(pki.server_cert), ssl_keyfile=str(pki.server_key),
        log_level="warning", access_log=False, lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "fake SuperLink did not start"
        time.sleep(0.02)
    try:
        yield Upstream(f"https://127.0.0.1:{port}", pki, app)
    finally:
        server.should_exit = True
        thread.join(timeout=5)


@pytest.fixture
def upstream(upstream_server: Upstream) -> Upstream:
    upstream_server.app.seen.clear()
    return upstream_server


@pytest.fixture
def gateway(upstream: Upstream) -> Iterator[TestClient]:
    with TestClient(make_app(upstream.url, upstream.pki.ca_cert), base_url="https://gateway.example") as client:
        yield client


def raw_call(client: TestClient, method: str, raw_path: bytes) -> tuple[int, bytes]:
    """One request with an exact, unnormalised path (httpx would resolve ``..`` itself)."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Message = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "https",
        "path": unquote(raw_path.decode("latin-1")), "raw_path": raw_path, "query_string": b"", "root_path": "",
        "headers": [(b"host", b"gateway.example")], "client": ("127.0.0.1", 50000), "server": ("gateway.example", 443),
    }
    assert client.portal is not None
    client.portal.call(client.app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return int(start["status"]), body


# --- forwarding -----------------------------------------------------------------------------


def test_fleet_request_is_forwarded_with_body_and_headers_unchanged(gateway: TestClient, upstream: Upstream) -> None:
    body = b"\x00\x01\x02protobuf\xff" * 100
    resp = gateway.post(
        "/v1/fleet/pull-messages?x=1",
        content=body,
        headers={**AUTH_HEADERS, "content-type": "application/protobuf", "connection": "keep-alive, x-hop", "x-hop": "secret"},
    )
    assert resp.status_code == 202
    assert resp.content == b"echo:" + body
    assert resp.headers["x-upstream"] == "fake-superlink"
    assert resp.headers["content-type"] == "application/protobuf"
    assert resp.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert resp.headers["content-length"] == str(len(resp.content))

    [seen] = upstream.app.seen
    assert (seen.method, seen.raw_path, seen.query, seen.body) == ("POST", b"/v1/fleet/pull-messages", b"x=1", body)
    for name, value in AUTH_HEADERS.items():
        assert seen.header(name) == [value]
    assert seen.header("content-type") == ["application/protobuf"]
    assert seen.header("content-length") == [str(len(body))]
    assert seen.header("host") == [upstream.url.removeprefix("https://")]
    assert seen.header("x-hop") == [] and seen.header("connection") in ([], ["keep-alive"])


def test_upstream_status_and_encoded_body_pass_through(gateway: TestClient, upstream: Upstream) -> None:
    missing = gateway.post("/v1/fleet/missing", content=b"x")
    assert (missing.status_code, missing.content) == (404, b"no such route")
    zipped = gateway.get("/v1/fleet/gzip", headers={"accept-encoding": "gzip"})
    assert zipped.status_code == 200 and zipped.headers["content-encoding"] == "gzip"
    assert zipped.content == b"compressed payload"  # still gzip on the wire: decoded once, by the client
    assert [s.raw_path for s in upstream.app.seen] == [b"/v1/fleet/missing", b"/v1/fleet/gzip"]


def test_health_get_and_head_are_forwarded(gateway: TestClient, upstream: Upstream) -> None:
    got = gateway.get("/health")
    assert (got.status_code, got.json()) == (200, {"status": "ok"})
    head = gateway.head("/health")
    assert head.status_code == 200 and head.content == b""
    assert [(s.method, s.raw_path) for s in upstream.app.seen] == [("GET", b"/health"), ("HEAD", b"/health")]


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/start-run"),
        ("GET", "/v1/control/list-runs"),
        ("POST", "/v1/runtime/pull-app-inputs"),
        ("GET", "/"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("POST", "/v1/fleet"),
        ("POST", "/v1/fleet/"),
        ("POST", "/v1/fleetx/register-node"),
        ("GET", "/health/x"),
        ("GET", "/HEALTH"),
    ],
)
def test_everything_but_the_fleet_api_is_403_and_never_forwarded(
    gateway: TestClient, upstream: Upstream, method: str, path: str
) -> None:
    resp = gateway.request(method, path, content=b"{}" if method == "POST" else None)
    assert resp.status_code == 403
    assert resp.json() == {"detail": FORBIDDEN_DETAIL}
    assert upstream.app.seen == []


@pytest.mark.parametrize("raw_path", TRICKS)
def test_path_tricks_are_403_and_never_forwarded(gateway: TestClient, upstream: Upstream, raw_path: bytes) -> None:
    status, body = raw_call(gateway, "POST", raw_path)
    assert status == 403, raw_path
    assert b"Control API" in body
    assert upstream.app.seen == []


def test_percent_encoded_tricks_are_403_through_a_real_http_client(gateway: TestClient, upstream: Upstream) -> None:
    for raw_path in (b"/v1/fleet/%2e%2e/control/x", b"/v1/fleet%2f..", b"/v1/fleet/..%2fcontrol"):
        url = httpx.URL("https://gateway.example").copy_with(raw_path=raw_path)
        assert gateway.post(url, content=b"{}").status_code == 403
    assert upstream.app.seen == []


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("PUT", "/v1/fleet/push-messages", "GET, POST"), ("DELETE", "/v1/fleet/x", "GET, POST"),
     ("HEAD", "/v1/fleet/x", "GET, POST"), ("OPTIONS", "/v1/fleet/x", "GET, POST"), ("POST", "/health", "GET, HEAD")],
)
def test_other_methods_are_405(gateway: TestClient, upstream: Upstream, method: str, path: str, allow: str) -> None:
    resp = gateway.request(method, path)
    assert resp.status_code == 405 and resp.headers["allow"] == allow
    assert upstream.app.seen == []


@pytest.mark.parametrize(
    "path",
    ["/v1/fleet/register-node", "/v1/fleet/push-messages", "/health", "/v1/fleet/a-b_c.d~e/f"],
)
def test_is_allowed_path_accepts_plain_fleet_paths(path: str) -> None:
    assert is_allowed_path(path)


@pytest.mark.parametrize("path", [p.decode("latin-1") for p in TRICKS] + ["/v1/control/x", "v1/fleet/x", "*", ""])
def test_is_allowed_path_refuses_the_rest(path: str) -> None:
    assert not is_allowed_path(path)


# --- upstream failures ----------------------------------------------------------------------


def test_upstream_down_is_502_without_traceback(pki: Pki) -> None:
    with TestClient(make_app(f"https://127.0.0.1:{free_port()}", pki.ca_cert)) as client:
        resp = client.post("/v1/fleet/register-node", content=b"x")
    assert resp.status_code == 502
    assert set(resp.json()) == {"detail"} and "unreachable" in resp.json()["detail"]
    assert b"Traceback" not in resp.content


def test_upstream_with_an_untrusted_certificate_is_502(upstream: Upstream, tmp_path: Path) -> None:
    other_ca = create_dev_pki(tmp_path / "other").ca_cert
    with TestClient(make_app(upstream.url, other_ca)) as client:
        assert client.post("/v1/fleet/register-node", content=b"x").status_code == 502
    assert upstream.app.seen == []


def test_upstream_too_slow_is_504(upstream: Upstream) -> None:
    with TestClient(make_app(upstream.url, upstream.pki.ca_cert, timeout=0.3)) as client:
        resp = client.post("/v1/fleet/slow", content=b"x")
    assert resp.status_code == 504 and "detail" in resp.json()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9093", "https://127.0.0.1:9093/v1/control", "127.0.0.1:9093"])
def test_make_app_wants_a_bare_https_upstream(pki: Pki, url: str) -> None:
    with pytest.raises(ValueError):
        make_app(url, pki.ca_cert)


# --- the real server ------------------------------------------------------------------------


def _raw_tls_request(port: int, ctx: ssl.SSLContext, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(request)
        chunks = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_served_gateway_over_real_https(upstream: Upstream, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "gateway.log"
    cmd = [
        sys.executable, "-m", "fedgov.deploy.gateway", "--host", "127.0.0.1", "--port", str(port),
        "--upstream", upstream.url, "--ca-cert", str(upstream.pki.ca_cert),
        "--certfile", str(upstream.pki.server_cert), "--keyfile", str(upstream.pki.server_key),
    ]
    ctx = ssl.create_default_context(cafile=str(upstream.pki.ca_cert))
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        base = f"https://127.0.0.1:{port}"
        with httpx.Client(base_url=base, verify=ctx, trust_env=False, timeout=5) as client:
            deadline = time.monotonic() + 10
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    health = client.get("/health")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "gateway did not come up:\n" + log.read_text()
                    time.sleep(0.05)
            assert (health.status_code, health.json()) == (200, {"status": "ok"})

            control = client.post("/v1/control/start-run", content=b"{}")
            assert control.status_code == 403 and "Control API" in control.json()["detail"]

            fleet = client.post("/v1/fleet/send-node-heartbeat", content=b"beat", headers=AUTH_HEADERS)
            assert (fleet.status_code, fleet.content) == (202, b"echo:beat")

        sneaky = _raw_tls_request(
            port, ctx, b"POST /v1/fleet/../control/start-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        assert sneaky.startswith(b"HTTP/1.1 403"), sneaky[:100]

        assert [(s.method, s.raw_path) for s in upstream.app.seen] == [
            ("GET", b"/health"), ("POST", b"/v1/fleet/send-node-heartbeat")
        ]
        assert upstream.app.seen[1].header("flwr-signature-bin") == [AUTH_HEADERS["flwr-signature-bin"]]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    assert b"Traceback" not in log.read_bytes()
