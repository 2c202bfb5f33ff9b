"""`sam2-layerwise view`: the viewer page of one run, served by Starlette on uvicorn, plus what needs computing.

Routes (GET and HEAD; the two computing endpoints also take POST with a JSON object of the same parameters):
    /                 -> redirect to the page (`<page>/index.html`)
    /api/info         the run: kind, mode, page, layers that answer clicks
    /api/prepare      ?layer=KEY&call=N: load a call's q/k/v ahead of the first click
    /api/query        ?layer=KEY&call=N&x=X&y=Y (original pixels): the token under (x, y) and both models'
                      attention at that call, recomputed from the saved q/k (`viewer.recompute`); answers
                      {ok: true, token, map} or {ok: false, message, token} (not saved there), 400 {error} for
                      a parameter that is wrong (unknown layer, call index out of range, x/y outside)
    /<path>           a file of the run directory, nothing else

Files: the path must name a regular file inside the run directory after resolving symbolic links; `..`
(also percent-encoded), absolute paths, backslashes, NUL and hidden entries (staging folders) are refused.
Parameters are checked: a wrong one is a 400 with a message, never a traceback. Hosts other than the one served
are refused (DNS rebinding), and responses forbid framing and content sniffing.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import mimetypes
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from sam2_layerwise.viewer.recompute import BadRequest, Recomputer
from sam2_layerwise.viewer.source import ViewerRun

log = logging.getLogger("sam2_layerwise")

# Scripts only from the run's own files: no inline script, no other origin. The page never evaluates strings;
# 'unsafe-eval' is there for browser automation (Playwright's wait_for_function evaluates its predicate in the page).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self' 'unsafe-eval'; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'; object-src 'none'",
}
mimetypes.add_type("text/javascript", ".js")
MAX_BODY = 4096  # a POSTed query is a few numbers
ALIASES = {"layer_key": "layer", "call_index": "call"}  # the summary's own names work too


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def safe_file(root: Path, rel: str) -> Path | None:
    """The regular file `rel` names inside `root` (symbolic links resolved and checked), or None."""
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/") or len(rel) > 4096:
        return None
    parts = rel.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        return None
    base = root.resolve()
    try:
        path = (base / rel).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a link loop
        return None
    if not path.is_relative_to(base) or not path.is_file():
        return None
    return path


def _json(data, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers={"Cache-Control": "no-store"})


def build_app(vrun: ViewerRun, page: str, *, allowed_hosts: list[str] | None = None) -> Starlette:
    """The app serving `vrun.run_dir` with the viewer page at `page/index.html` (run-relative folder)."""
    root = vrun.run_dir.resolve()
    recompute = Recomputer(vrun)
    page_url = "/" + quote(f"{page}/index.html")

    def click_modes() -> dict:
        from sam2_layerwise.viewer.export import TOKEN_KINDS

        out = {}
        for key, call in vrun.order:
            kind = vrun.halves[0].entries[(key, call)]["kind"]
            out[f"{key}#{call}"] = "tokens" if kind in TOKEN_KINDS else "server"
        return out

    async def index(request: Request) -> Response:
        return RedirectResponse(page_url, status_code=302)

    async def info(request: Request) -> Response:
        return _json({"server": True, "kind": vrun.kind, "mode": vrun.mode, "page": page_url,
                      "run": vrun.run_dir.name, "calls": click_modes()})

    async def _params(request: Request, names: tuple[str, ...]) -> dict:
        """The endpoint's parameters: from the URL (GET) or a small JSON object (POST); each at most once."""
        if request.method == "POST":
            if request.query_params:
                raise BadRequest("give the parameters in the JSON body or in the URL, not both")
            body = await request.body()
            if len(body) > MAX_BODY:
                raise BadRequest(f"the request body is larger than {MAX_BODY} bytes")
            try:
                data = json.loads(body or b"{}")
            except (ValueError, RecursionError):
                raise BadRequest("the request body is not JSON") from None
            if not isinstance(data, dict):
                raise BadRequest("the request body must be a JSON object {layer, call, x, y}")
            items = list(data.items())
        else:
            items = list(request.query_params.multi_items())
        params: dict = {}
        for key, value in items:
            key = ALIASES.get(key, key)
            if key not in names:
                raise BadRequest(f"unknown parameter {str(key)[:60]!r}; expected {', '.join(names)}")
            if key in params:
                raise BadRequest(f"{key} given more than once")
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise BadRequest(f"{key} must be a string or a number")
            params[key] = value if isinstance(value, str) else repr(value)
        return {n: params.get(n) for n in names}

    async def prepare(request: Request) -> Response:
        try:
            p = await _params(request, ("layer", "call"))
            return _json(await run_in_threadpool(recompute.prepare, p["layer"], p["call"]))
        except BadRequest as exc:
            return _json({"ok": False, "error": str(exc)}, 400)

    async def query(request: Request) -> Response:
        try:
            p = await _params(request, ("layer", "call", "x", "y"))
            return _json(await run_in_threadpool(recompute.query, p["layer"], p["call"], p["x"], p["y"]))
        except BadRequest as exc:
            return _json({"ok": False, "error": str(exc)}, 400)

    async def api_unknown(request: Request) -> Response:
        return _json({"ok": False, "error": f"no such endpoint {request.url.path[:120]}"}, 404)

    async def files(request: Request) -> Response:
        rel = request.path_params["path"]
        path = safe_file(root, rel)
        if path is None:
            return PlainTextResponse("not found (this server shows only the files of its run directory)", 404)
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if media.startswith("text/") or media in ("application/json", "text/javascript"):
            media += "; charset=utf-8"
        return FileResponse(path, media_type=media, headers={"Cache-Control": "no-cache"})

    routes = [
        Route("/", index, methods=["GET", "HEAD"]),
        Route("/api/info", info, methods=["GET", "HEAD"]),
        Route("/api/prepare", prepare, methods=["GET", "HEAD", "POST"]),
        Route("/api/query", query, methods=["GET", "HEAD", "POST"]),
        Route("/api/{rest:path}", api_unknown, methods=["GET", "HEAD"]),
        Route("/{path:path}", files, methods=["GET", "HEAD"]),
    ]
    middleware = [Middleware(SecurityHeaders), Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["*"])]
    return Starlette(routes=routes, middleware=middleware, exception_handlers={500: _internal_error})


class SecurityHeaders:
    """ASGI middleware: every response (errors and refusals too) forbids sniffing, framing and other origins."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("viewer: %s %s failed: %s: %s", request.method, request.url.path[:200], type(exc).__name__, exc)
    return PlainTextResponse("internal error (see the server's log)", 500)


def hosts_for(host: str, port: int) -> list[str]:
    """The Host header values to accept: the served address and, on loopback, localhost; any for 0.0.0.0/::."""
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    names = {host, host.strip("[]")}
    if is_loopback(host):
        names |= {"127.0.0.1", "localhost", "::1", "[::1]"}
    return sorted(names)
