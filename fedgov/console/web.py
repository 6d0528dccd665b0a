"""What both consoles share: the Starlette application, its templates, login and the guards.

:func:`console_app` builds a Starlette application around a console's own routes and adds

* ``GET/POST /login`` and ``POST /logout`` (:class:`~fedgov.console.security.Guard`);
* a middleware that sends every request without a live session to the login page (a GET) or
  refuses it (anything else, 403), refuses a ``Host`` the console does not serve (DNS
  rebinding), and sets the security headers on every response: a Content-Security-Policy
  that allows no script at all (the pages are server-rendered, their charts are SVG) and no
  framing, ``nosniff``, no referrer to other sites, no caching;
* :func:`form`, which every state-changing handler awaits: the form's fields, once the
  session's CSRF token in it and the request's ``Origin`` are checked (403 otherwise);
* error pages: a :class:`~fedgov.errors.FedgovError` becomes its message (never a traceback).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from fedgov.console.security import Guard, Session, is_loopback
from fedgov.errors import FedgovError

__all__ = ["LOOPBACK_HOSTS", "Page", "allowed_hosts_for", "console_app", "form", "local_path", "render", "session_of"]

HERE = Path(__file__).resolve().parent
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
MAX_FORM_BYTES = 64 * 1024
PUBLIC = ("/login", "/static/", "/favicon.ico")

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

Page = Callable[[Request], Awaitable[Response]]


def allowed_hosts_for(host: str) -> list[str] | None:
    """The ``Host`` names a console bound to ``host`` answers: on a loopback address the
    loopback names and that address (a DNS-rebinding page names its own site, refused); None
    (any) elsewhere, where TLS is required and its certificate names the host."""
    if not is_loopback(host):
        return None
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return list(LOOPBACK_HOSTS) + ([shown] if shown not in LOOPBACK_HOSTS else [])


# --------------------------------------------------------------------------- templates


def _num(value: Any, spec: str = ".3f") -> str:
    """A number for a page: '-' for None or a non-finite value."""
    if value is None or isinstance(value, bool):
        return "-" if value is None else ("yes" if value else "no")
    if isinstance(value, int | float):
        if not math.isfinite(float(value)):
            return "-"
        return format(value, spec)
    return str(value)


def _time(value: datetime | str | None) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")
        except ValueError:
            return value
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(HERE / "templates")),
        autoescape=select_autoescape(["html", "svg"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    env.filters["time"] = _time
    env.filters["q"] = lambda s: quote(str(s), safe="")
    return env


_ENV = _environment()


def session_of(request: Request) -> Session:
    """The logged-in session (the middleware let the request through only with one)."""
    s = getattr(request.state, "session", None)
    if not isinstance(s, Session):
        raise HTTPException(403, "not logged in")
    return s


def render(request: Request, template: str, context: Mapping[str, Any], *, status: int = 200) -> HTMLResponse:
    """A page: ``template`` with ``context`` plus what every page shows (the console's chrome)."""
    app_state = request.app.state
    chrome: Callable[[], dict[str, Any]] = app_state.chrome
    session = getattr(request.state, "session", None)
    ctx: dict[str, Any] = {
        "request": request,
        "path": request.url.path,
        "title": app_state.title,
        "holder": app_state.holder,
        "nav": app_state.nav,
        "session": session,
        "csrf": session.csrf if isinstance(session, Session) else "",
        **(chrome() if isinstance(session, Session) else {}),
        **context,
    }
    html = _ENV.get_template(template).render(ctx)
    return HTMLResponse(html, status_code=status)


# --------------------------------------------------------------------------- forms


def _parse(body: bytes) -> dict[str, str]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "the form is not UTF-8") from None
    return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=50))


def _same_origin(request: Request) -> bool:
    """A browser names the page a form came from in ``Origin``: it must be this console."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None  # 'null': a sandboxed or privacy-stripped origin; refuse it
    parts = urlsplit(origin)
    return parts.netloc == request.headers.get("host", "") and parts.scheme == request.url.scheme


async def _body(request: Request) -> bytes:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise HTTPException(415, "expected a form (application/x-www-form-urlencoded)")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, "the form is too large")
    return body


async def form(request: Request) -> dict[str, str]:
    """The fields of a state-changing form, after the forgery checks (403 if one fails)."""
    session = session_of(request)
    if not _same_origin(request):
        raise HTTPException(403, "refused: the form was sent from another site")
    fields = _parse(await _body(request))
    if not Guard.csrf_ok(session, fields.get("csrf")):
        raise HTTPException(403, "refused: the form's anti-forgery token is missing or wrong; reload the page and try again")
    return fields


# --------------------------------------------------------------------------- login


def local_path(target: str | None) -> str:
    """Where to go after a form (login, pause): a path of this console only, never another
    site: "/" for anything else, also for what a browser would read as another site once it
    drops tabs and newlines or reads a backslash as a slash (``/\\evil``, ``/<tab>/evil``)."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    if any(c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return "/"
    return target


async def login_page(request: Request) -> Response:
    return render(request, "login.html", {"next": local_path(request.query_params.get("next")), "error": ""})


async def login_submit(request: Request) -> Response:
    guard: Guard = request.app.state.guard
    if not _same_origin(request):
        raise HTTPException(403, "refused: the login form was sent from another site")
    fields = _parse(await _body(request))
    target = local_path(fields.get("next"))
    if guard.throttled():
        return render(request, "login.html", {"next": target, "error": "Too many failed logins; wait a minute."}, status=429)
    session = guard.login(fields.get("secret", ""), fields.get("name", ""))
    if session is None:
        return render(request, "login.html", {"next": target, "error": "That is not this console's token or password."}, status=401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        guard.cookie_name, session.sid, httponly=True, samesite="strict", secure=guard.secure, path="/",
    )
    return response


async def logout(request: Request) -> Response:
    await form(request)
    guard: Guard = request.app.state.guard
    guard.logout(session_of(request).sid)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(guard.cookie_name, path="/", secure=guard.secure, httponly=True, samesite="strict")
    return response


# --------------------------------------------------------------------------- middleware


class _Guarded(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        state = request.app.state
        hosts: Sequence[str] | None = state.allowed_hosts
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if hosts is not None and name not in hosts:
            return _headers(PlainTextResponse("unknown host", status_code=400), state.guard)
        guard: Guard = state.guard
        session = guard.session(request.cookies.get(guard.cookie_name))
        request.state.session = session
        path = request.url.path
        if session is None and not path.startswith(PUBLIC):
            if request.method in ("GET", "HEAD"):
                target = path + (f"?{request.url.query}" if request.url.query else "")
                response: Response = RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
            else:
                response = render(request, "error.html", {"status": 403, "message": "refused: log in first"}, status=403)
            return _headers(response, guard)
        return _headers(await call_next(request), guard)


def _headers(response: Response, guard: Guard) -> Response:
    h = response.headers
    h["Content-Security-Policy"] = CSP
    h["X-Content-Type-Options"] = "nosniff"
    # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" with
    # every form, and the forgery check could not tell this console's own forms from others
    h["Referrer-Policy"] = "same-origin"
    h["X-Frame-Options"] = "DENY"
    h["Cross-Origin-Opener-Policy"] = "same-origin"
    h.setdefault("Cache-Control", "no-store")
    if guard.secure:
        h["Strict-Transport-Security"] = "max-age=31536000"
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return render(request, "error.html", {"status": exc.status_code, "message": exc.detail}, status=exc.status_code)


async def _fedgov_error(request: Request, exc: Exception) -> Response:
    return render(request, "error.html", {"status": 409, "message": str(exc)}, status=409)


def console_app(
    *,
    title: str,
    guard: Guard,
    routes: Sequence[BaseRoute],
    nav: Sequence[tuple[str, str]],
    chrome: Callable[[], dict[str, Any]] | None = None,
    allowed_hosts: Sequence[str] | None = None,
    holder: str = "console",
) -> Starlette:
    """A console: ``routes`` behind the login, ``nav`` (path, label) on every page, ``chrome()``'s
    values in every page's template (e.g. the audit log's state), ``allowed_hosts`` the ``Host``
    names it answers (None: any; the command line passes the loopback names when bound there),
    ``holder`` whose files it reads ("node", "coordinator"), in words."""
    app = Starlette(
        routes=[
            Route("/login", login_page, methods=["GET"]),
            Route("/login", login_submit, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/favicon.ico", lambda request: Response(status_code=204)),
            Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
            *routes,
        ],
        middleware=[Middleware(_Guarded)],
        exception_handlers={HTTPException: _http_error, FedgovError: _fedgov_error},
    )
    app.state.title = title
    app.state.holder = holder
    app.state.guard = guard
    app.state.nav = list(nav)
    app.state.chrome = chrome or dict
    app.state.allowed_hosts = list(allowed_hosts) if allowed_hosts is not None else None
    return app
