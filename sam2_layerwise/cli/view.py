"""`sam2-layerwise view RUN_DIR`: serve a run's viewer page on a local server and answer clicks anywhere on the
photograph (the attention of the token there, recomputed from the saved q/k; no model). A sweep directory is
served too: its page (heatmap over the items, the items where a head changed most) and its kept runs."""

from __future__ import annotations

import logging
import socket
import sys
import threading
from pathlib import Path

from sam2_layerwise.cli.common import setup_logging
from sam2_layerwise.errors import InputError

log = logging.getLogger("sam2_layerwise")

EXAMPLES = """examples:
  # a compare run after generate (its page is RUN/analysis/index.html); the URL is printed
  sam2-layerwise view sam2_logs/interactive_viz/run_latest
  # a visualize run written with --viewer, opened in the browser
  sam2-layerwise view sam2_logs/layerwise_debug --open
  # another analysis folder (generate --output NAME), a fixed port
  sam2-layerwise view RUN --page analysis_decoder --port 8765
  # a sweep directory: its page, and each item's run when the sweep ran with --keep-runs
  sam2-layerwise view sweeps/w8a8"""

PAGES = {"compare": "analysis", "single": "viewer"}


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a compare run (after generate), a visualize run written "
                                                      "with --viewer (its page folder works too), or a sweep "
                                                      "directory (sweep --output-dir)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=_port, default=0, help="port (default 0: a free one)")
    p.add_argument("--page", default=None, metavar="NAME",
                   help="the folder holding index.html (default: analysis for compare runs, viewer for visualize runs)")
    p.add_argument("--open", action="store_true", help="open the page in the default web browser")


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise __import__("argparse").ArgumentTypeError("must be a port number 0-65535") from None
    if not 0 <= v <= 65535:
        raise __import__("argparse").ArgumentTypeError("must be a port number 0-65535")
    return v


def find_page(run_dir: str, page: str | None):
    """(ViewerRun, page folder name): RUN_DIR may be the run or its page folder (a folder holding index.html
    and viewer_data/ inside a run)."""
    from sam2_layerwise.store.layout import safe_name
    from sam2_layerwise.viewer.export import DATA
    from sam2_layerwise.viewer.source import is_compare_run, open_viewer_run

    p = Path(run_dir).expanduser()
    if p.is_dir() and (p / "index.html").is_file() and (p / DATA).is_dir() and page is None:
        parent = p.resolve().parent
        if is_compare_run(parent) or (parent / "layerwise_summary.json").is_file():
            page, p = p.resolve().name, parent
    vrun = open_viewer_run(p, flag="RUN_DIR")
    name = page if page is not None else PAGES[vrun.kind]
    if safe_name(name) != name or name in ("original", "quantized"):
        raise InputError("must be one plain folder name inside the run", flag="--page", value=name)
    if not (vrun.run_dir / name / "index.html").is_file() or not (vrun.run_dir / name / DATA / "index.js").is_file():
        made = (f"sam2-layerwise generate --run_dir {run_dir}" + (f" --output {name}" if name != "analysis" else "")
                if vrun.kind == "compare" else "sam2-layerwise visualize ... --viewer")
        found = sorted(d.name for d in vrun.run_dir.iterdir() if (d / DATA / "index.js").is_file())
        raise InputError(f"has no viewer page in {name}/ (write it with '{made}')"
                         + (f"; pages found: {', '.join(found)} (pass --page)" if found else ""),
                         flag="RUN_DIR", value=run_dir)
    return vrun, name


def find_sweep(run_dir: str, page: str | None):
    """The sweep directory RUN_DIR names (itself or its sweep/ folder), opened and checked; None when it is
    not one."""
    from sam2_layerwise.viewer.sweep_source import is_sweep_dir, open_sweep

    p = Path(run_dir).expanduser()
    if not (is_sweep_dir(p) or (p.name == "sweep" and is_sweep_dir(p.parent))):
        return None
    if page is not None:
        raise InputError("does not apply to a sweep directory (its page is sweep/index.html)", flag="--page",
                         value=page)
    return open_sweep(p, flag="RUN_DIR")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 takes a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"is not an address of this machine ({exc.strerror})", flag="--host", value=host) from None
    sock = socket.socket(infos[0][0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(infos[0][4])
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc})", flag="--port" if port else "--host",
                         value=port if port else host) from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def run(args) -> int:
    import uvicorn

    from sam2_layerwise.viewer.server import build_app, build_sweep_app, hosts_for, is_loopback

    setup_logging(args.quiet)
    sweep = find_sweep(args.run_dir, args.page)
    if sweep is not None:
        served, page_path, what = sweep.path, "sweep/index.html", (
            f"sweep {sweep.path} ({len(sweep.tables().ok)} items measured)")
    else:
        vrun, page = find_page(args.run_dir, args.page)
        served, page_path, what = vrun.run_dir, f"{page}/index.html", (
            f"{vrun.kind} run {vrun.run_dir} ({vrun.mode or 'single model'})")
    sock = listen(args.host, args.port)
    port = sock.getsockname()[1]
    host_in_url = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    url = f"http://{host_in_url if args.host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}/{page_path}"
    if not is_loopback(args.host):
        sys.stderr.write(
            f"WARNING: serving on {args.host}:{port}, NOT only this machine: anyone who can reach this address can "
            f"read every file of {served} (tensors, predictions, the page). There is no password. Use the "
            f"default --host 127.0.0.1 unless you mean it.\n")
    if sweep is not None:
        app = build_sweep_app(sweep, allowed_hosts=hosts_for(args.host, port))
    else:
        app = build_app(vrun, page, allowed_hosts=hosts_for(args.host, port))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    print(f"sam2-layerwise view: {what}", flush=True)
    print(f"viewer: {url}", flush=True)
    print("press Ctrl-C to stop", flush=True)
    if args.open:
        import webbrowser

        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM is how a server is stopped: not an error
        pass
    finally:
        sock.close()
    print("sam2-layerwise view: stopped", flush=True)
    return 0
