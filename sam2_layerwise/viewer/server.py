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

The page asks for the endpoints relative to itself (`../api/`), so the same app also serves a run mounted under
a prefix: `build_sweep_app` (a sweep directory: its page, its tables' data, and each kept run at /runs/<name>/,
whose page generate never wrote is made in memory).

Files: the path must name a regular file inside the run directory after resolving symbolic links; `..`
(also percent-encoded), absolute paths, backslashes, NUL and hidden entries (staging folders) are refused.
Parameters are checked: a wrong one is a 400 with a message, never a traceback. Hosts other than the one served
are refused (DNS rebinding), and responses forbid framing and content sniffing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import mimetypes
from collections import OrderedDict
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from sam2_layerwise.errors import LayerwiseError
from sam2_layerwise.viewer.recompute import BadRequest, Recomputer, _whole
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


async def read_params(request: Request, names: tuple[str, ...]) -> dict:
    """The endpoint's parameters: from the URL (GET) or a small JSON object (POST); each at most once."""
    if request.method == "POST":
        if request.query_params:
            raise BadRequest("give the parameters in the JSON body or in the URL, not both")
        too_large = BadRequest(f"the request body is larger than {MAX_BODY} bytes")
        declared = request.headers.get("content-length", "0")
        if not declared.isascii() or not declared.isdigit() or int(declared) > MAX_BODY:
            raise too_large
        body = b""
        async for chunk in request.stream():  # never more than the limit in memory, whatever the header said
            body += chunk
            if len(body) > MAX_BODY:
                raise too_large
        try:
            data = json.loads(body or b"{}")
        except (ValueError, RecursionError):
            raise BadRequest("the request body is not JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object {" + ", ".join(names) + "}")
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


def _json(data, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers={"Cache-Control": "no-store"})


def _media(name: str) -> str:
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if media.startswith("text/") or media in ("application/json", "text/javascript"):
        media += "; charset=utf-8"
    return media


def build_app(vrun: ViewerRun, page: str, *, allowed_hosts: list[str] | None = None,
              generated: dict[str, bytes] | None = None) -> Starlette:
    """The app serving `vrun.run_dir` with the viewer page at `page/index.html` (run-relative folder).
    `generated`: the page's files made in memory (run-relative path -> bytes) for a run that has none on disk;
    then nothing under `page/` is read from disk. Mounted under a prefix (a sweep's kept run), the page's
    links and the redirect stay under it (the page asks ../api/)."""
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
        return RedirectResponse(request.scope.get("root_path", "") + page_url, status_code=302)

    async def info(request: Request) -> Response:
        return _json({"server": True, "kind": vrun.kind, "mode": vrun.mode,
                      "page": request.scope.get("root_path", "") + page_url, "run": vrun.run_dir.name,
                      "calls": click_modes()})

    async def prepare(request: Request) -> Response:
        try:
            p = await read_params(request, ("layer", "call"))
            return _json(await run_in_threadpool(recompute.prepare, p["layer"], p["call"]))
        except BadRequest as exc:
            return _json({"ok": False, "error": str(exc)}, 400)

    async def query(request: Request) -> Response:
        try:
            p = await read_params(request, ("layer", "call", "x", "y"))
            return _json(await run_in_threadpool(recompute.query, p["layer"], p["call"], p["x"], p["y"]))
        except BadRequest as exc:
            return _json({"ok": False, "error": str(exc)}, 400)

    async def api_unknown(request: Request) -> Response:
        return _json({"ok": False, "error": f"no such endpoint {request.url.path[:120]}"}, 404)

    async def files(request: Request) -> Response:
        rel = request.path_params["path"]
        if generated is not None and (rel == page or rel.startswith(page + "/")):
            if rel not in generated:
                return PlainTextResponse("not found (this server shows only the files of its run directory)", 404)
            return Response(generated[rel], media_type=_media(rel), headers={"Cache-Control": "no-cache"})
        path = safe_file(root, rel)
        if path is None:
            return PlainTextResponse("not found (this server shows only the files of its run directory)", 404)
        return FileResponse(path, media_type=_media(path.name), headers={"Cache-Control": "no-cache"})

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


# -- a sweep directory ----------------------------------------------------------------------------------------
SWEEP_PAGE = "sweep/index.html"
SWEEP_STATIC = ("sweep.js", "sweep.css", "viewer.css")  # the only package files served, at /static/<name>
MAX_ITEMS = 1000  # items listed per head


def build_sweep_app(source, *, allowed_hosts: list[str] | None = None, kept_apps: int = 4) -> Starlette:
    """The app serving a sweep directory (`source`: viewer.sweep_source.SweepSource). Routes:
        /                   -> redirect to /sweep/index.html
        /sweep/index.html   the sweep page (sweep/page.py), its script and styles from /static/
        /api/info           {server, kind: "sweep", page}
        /api/sweep          the page's data: heatmap, layers, attribution units (the sweep's tables, checked)
        /api/sweep/items    ?layer=KEY&call=N&head=H&metric=M&n=K: the K items where that head changed most by
                            the per-item metric M (js_mean, out_rel_err, entropy_norm_delta, ...), most first
        /runs/<name>/...    a kept run (--keep-runs) in the viewer: its analysis/ page when generate wrote one,
                            otherwise generate's page made in memory on first visit; clicks recomputed as for
                            any compare run (the page asks /runs/<name>/api/)
        /<path>             a file of the sweep directory, nothing else
    """
    from sam2_layerwise.sweep.aggregate import CHANGE
    from sam2_layerwise.sweep.page import render
    from sam2_layerwise.viewer.sweep_source import NAME

    root = source.path.resolve()
    kept = KeptRuns(source, kept_apps)

    async def index(request: Request) -> Response:
        return RedirectResponse("/" + SWEEP_PAGE, status_code=302)

    async def page(request: Request) -> Response:
        return Response(render(None, inline=False), media_type=_media("index.html"),
                        headers={"Cache-Control": "no-cache"})

    async def static(request: Request) -> Response:
        from importlib import resources

        name = request.path_params["name"]
        if name not in SWEEP_STATIC:
            return PlainTextResponse("not found", 404)
        data = (resources.files("sam2_layerwise.viewer") / "static" / name).read_bytes()
        return Response(data, media_type=_media(name), headers={"Cache-Control": "no-cache"})

    async def info(request: Request) -> Response:
        return _json({"server": True, "kind": "sweep", "page": "/" + SWEEP_PAGE, "run": source.path.name})

    async def sweep(request: Request) -> Response:
        try:
            await read_params(request, ())
        except BadRequest as exc:
            return _json({"ok": False, "error": str(exc)}, 400)
        return _json(await run_in_threadpool(source.page_data))

    async def items(request: Request) -> Response:
        try:
            p = await read_params(request, ("layer", "call", "head", "metric", "n"))
            layer = p["layer"]
            if not layer:
                raise BadRequest("layer is missing (a layer key such as image_encoder_trunk_blocks_0)")
            known = await run_in_threadpool(source.layer_keys)
            if not NAME.match(layer) or layer not in known:
                raise BadRequest(f"unknown layer {layer[:120]!r}; this sweep measured {len(known)} layers, e.g. "
                                 f"{', '.join(sorted(known)[:3])}")
            call = _whole(p["call"] if p["call"] is not None else "0", "call")
            head = _whole(p["head"], "head")
            metric = p["metric"] or "js_mean"
            if metric not in CHANGE:
                raise BadRequest(f"metric must be one of {', '.join(CHANGE)} (got {metric[:40]!r})")
            n = _whole(p["n"] if p["n"] is not None else "10", "n")
            if not 1 <= n <= MAX_ITEMS:
                raise BadRequest(f"n must be 1..{MAX_ITEMS} (got {n})")
            try:
                return _json(await run_in_threadpool(source.top, layer, call, head, metric, n))
            except KeyError:
                raise BadRequest(f"the sweep measured no head {head} of {layer} call {call}") from None
        except BadRequest as exc:
            return _json({"ok": False, "error": str(exc)}, 400)

    async def api_unknown(request: Request) -> Response:
        return _json({"ok": False, "error": f"no such endpoint {request.url.path[:120]}"}, 404)

    async def files(request: Request) -> Response:
        rel = request.path_params["path"]
        path = safe_file(root, rel) if rel.split("/", 1)[0] != "runs" else None  # kept runs: only through /runs/
        if path is None:
            return PlainTextResponse("not found (this server shows only the files of its sweep directory)", 404)
        return FileResponse(path, media_type=_media(path.name), headers={"Cache-Control": "no-cache"})

    routes = [
        Route("/", index, methods=["GET", "HEAD"]),
        Route("/" + SWEEP_PAGE, page, methods=["GET", "HEAD"]),
        Route("/static/{name}", static, methods=["GET", "HEAD"]),
        Route("/api/info", info, methods=["GET", "HEAD"]),
        Route("/api/sweep", sweep, methods=["GET", "HEAD"]),
        Route("/api/sweep/items", items, methods=["GET", "HEAD", "POST"]),
        Route("/api/{rest:path}", api_unknown, methods=["GET", "HEAD"]),
        Mount("/runs/{name}", app=kept),
        Route("/{path:path}", files, methods=["GET", "HEAD"]),
    ]
    middleware = [Middleware(SecurityHeaders), Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["*"])]
    return Starlette(routes=routes, middleware=middleware, exception_handlers={500: _internal_error})


class KeptRuns:
    """ASGI app at /runs/{name}: the viewer of one kept run of the sweep, built on first visit (the run opened
    by the viewer's checked readers; its page from disk, or made in memory) and kept for the last few runs."""

    def __init__(self, source, limit: int):
        self.source = source
        self.limit = limit
        self.apps: OrderedDict[str, asyncio.Task] = OrderedDict()

    async def __call__(self, scope, receive, send):
        name = (scope.get("path_params") or {}).get("name", "")
        task = self.apps.get(name)
        if task is None:
            task = self.apps[name] = asyncio.ensure_future(self._build(name))
            for old in [k for k, t in self.apps.items() if t.done()][: max(0, len(self.apps) - self.limit)]:
                del self.apps[old]
        self.apps.move_to_end(name)
        app = await asyncio.shield(task)
        if isinstance(app, Response):  # not a kept run, or one that cannot be shown: tried again next time
            self.apps.pop(name, None)
            return await app(scope, receive, send)
        await app(scope, receive, send)

    async def _build(self, name: str):
        run_dir = await run_in_threadpool(self.source.run_dir, name)
        if run_dir is None:
            return PlainTextResponse("not found: this sweep kept no run of that name (sweep --keep-runs keeps them)",
                                     404)
        try:
            return await run_in_threadpool(kept_run_app, run_dir)
        except LayerwiseError as exc:
            return PlainTextResponse(f"this item's run cannot be shown: {exc}", 404)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the server down
            log.error("viewer: kept run %s failed: %s: %s", name[:100], type(exc).__name__, exc)
            return PlainTextResponse("internal error (see the server's log)", 500)


def kept_run_app(run_dir: Path) -> Starlette:
    """The viewer app of a sweep's kept run: its `analysis/` page when generate wrote one, else generate's page
    made in memory (nothing written into the sweep)."""
    from sam2_layerwise.errors import InputError
    from sam2_layerwise.viewer.export import DATA, compare_viewer_in_memory
    from sam2_layerwise.viewer.source import open_viewer_run

    flag = f"runs/{run_dir.name}"
    vrun = open_viewer_run(run_dir, flag=flag)
    if vrun.kind != "compare":
        raise InputError("is not a compare run", flag=flag)
    page = "analysis"
    on_disk = (run_dir / page / "index.html").is_file() and (run_dir / page / DATA / "index.js").is_file()
    generated = None if on_disk else compare_viewer_in_memory(vrun.compare, page)
    return build_app(vrun, page, generated=generated)
