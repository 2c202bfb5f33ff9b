"""The compiled all-query statistics kernel (`csrc/query_stats.cpp`), with the torch path as its fallback.

The kernel is compiled on first use with torch's extension tooling and cached (`ext_cache()`, default
`~/.cache/sam2_layerwise/ext/`), keyed by the source, torch and Python versions, so later runs load it in
milliseconds. It is portable: no `-march=native`; its hot loops carry
x86-64-v3/v4 clones chosen when it loads.

`SAM2_LAYERWISE_STATS_KERNEL` picks the path:
- `auto` (default): the compiled kernel when it builds, otherwise the torch path, said once in the log;
- `compiled`: the compiled kernel or an error saying why it did not build;
- `torch`: always the torch path.
Both paths compute the same statistics (to ~1e-6; tests hold both within 1e-5 of a float64 reference).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import platform
import sys
import threading
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import torch

log = logging.getLogger("sam2_layerwise")

MODE_ENV = "SAM2_LAYERWISE_STATS_KERNEL"
MODES = ("auto", "compiled", "torch")
SOURCE = Path(__file__).with_name("csrc") / "query_stats.cpp"
TILE_ELEMENTS = 1 << 18  # scores per tile: 1 MiB, inside a core's L2 cache
# -fopenmp: ATen's parallel_for is inline OpenMP code, serial without it. No -march: the hot loops carry clones.
CFLAGS = ["-O3", "-fopenmp"]

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module" (or None) and "reason", once tried


class KernelUnavailable(RuntimeError):
    """The compiled kernel was asked for (`SAM2_LAYERWISE_STATS_KERNEL=compiled`) and could not be built."""


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise KernelUnavailable(f"{MODE_ENV}={value!r} is not one of {', '.join(MODES)}")
    return value


def ext_cache() -> Path:
    """Where compiled kernels are kept: $SAM2_LAYERWISE_KERNEL_CACHE, else $XDG_CACHE_HOME/sam2_layerwise/ext, else
    ~/.cache/sam2_layerwise/ext (apart from the download cache, so pointing that elsewhere rebuilds nothing)."""
    if os.environ.get("SAM2_LAYERWISE_KERNEL_CACHE"):
        return Path(os.environ["SAM2_LAYERWISE_KERNEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sam2_layerwise" / "ext"


def _build_dir() -> tuple[str, Path]:
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(f"{torch.__version__}|{sys.version}|{platform.machine()}|{CFLAGS}".encode())
    digest = key.hexdigest()[:16]
    return f"sam2_layerwise_query_stats_{digest}", ext_cache() / digest


def _import(name: str, so: Path):
    spec = importlib.util.spec_from_file_location(name, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def _ninja_on_path():
    """torch's extension builder runs `ninja` from PATH; the pip package's binary is not on PATH when the venv's
    programs are run without activating it."""
    old = os.environ.get("PATH", "")
    try:
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, old]) if old else ninja.BIN_DIR
    except ImportError:
        pass
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _build():
    name, where = _build_dir()
    so = where / f"{name}.so"
    if so.is_file():  # built before: import it (cpp_extension.load would run ninja again to check)
        try:
            return _import(name, so)
        except ImportError:
            pass  # a half-written or foreign file: build it again
    where.mkdir(parents=True, exist_ok=True)
    log.info("compiling the statistics kernel once (about a minute) into %s", where)
    noise = io.StringIO()  # the compiler's output: shown only when the build fails
    try:
        with redirect_stdout(noise), redirect_stderr(noise), _ninja_on_path():
            from torch.utils import cpp_extension

            return cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(where),
                                      extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:
        detail = " ".join(noise.getvalue().split()[-40:])
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise KernelUnavailable(f"{type(exc).__name__}: {first}{' — ' + detail if detail else ''}") from exc


def kernel():
    """The compiled module, or None for the torch path (decided once per process)."""
    chosen = mode()
    if chosen == "torch":
        return None
    with _lock:
        if "module" not in _state:
            try:
                _state["module"] = _build()
                _state["reason"] = None
            except Exception as exc:  # no compiler, no ninja, a read-only cache, ...
                _state["module"] = None
                _state["reason"] = str(exc)[:2000]
                if chosen == "auto":
                    log.warning("statistics kernel not compiled (%s); using the torch path, about 2x slower for "
                                "all-query statistics", _state["reason"].splitlines()[0][:300])
        if _state["module"] is None and chosen == "compiled":
            raise KernelUnavailable(f"the compiled statistics kernel is unavailable: {_state['reason']}")
        return _state["module"]


def path_name() -> str:
    """'compiled' or 'torch': the path all-query statistics take in this process (builds the kernel if needed)."""
    return "compiled" if kernel() is not None else "torch"


class _Taken(threading.local):
    """The paths all-query statistics took since the last `reset_taken()`, per thread: a capture runs on one
    thread, and two captures may run at once (compare --video tracks both models in lockstep)."""

    def __init__(self):
        self.paths: set[str] = set()


_taken = _Taken()


def note_taken(path: str) -> None:
    _taken.paths.add(path)


def reset_taken() -> None:
    """Called when a capture starts, so its summary names the paths its own statistics took."""
    _taken.paths.clear()


def used() -> str | None:
    """The path(s) statistics took since the capture started (on this thread): 'compiled', 'torch' (the fallback,
    a GPU, or a quantized model's probability transform), 'compiled+torch', or None when none were computed."""
    return "+".join(sorted(_taken.paths)) or None


def query_stats(q: torch.Tensor, k: torch.Tensor, scale: float, topk: int, segments, stats: bool):
    """Statistics for q [G, h, Nq, d], k [G, h, Nk, d] (fp32 CPU) through the compiled kernel, which reads them
    where they lie (strided views of a qkv projection included; copied only when the last dimension is strided).

    Returns (entropy, max_prob, topk_mass) as [G * h, Nq] (None when not `stats`) and the segment mass
    [G * h, Nq, S] (None without `segments`)."""
    module = kernel()
    note_taken("compiled")
    seg = torch.tensor(segments or [], dtype=torch.int64).reshape(-1, 2)
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    ent, mx, top, seg_mass, _ = module.query_stats(q, k, float(scale), int(topk), seg, bool(stats), TILE_ELEMENTS)
    return (ent, mx, top) if stats else None, seg_mass if segments else None


def fast_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, topk: int):
    """The attention output softmax(scale q kᵀ) v [G, h, Nq, dv] and the statistics (entropy, max_prob, topk_mass)
    [G * h, Nq] of q [G, h, Nq, d], k [G, h, Nk, d], v [G, h, Nk, dv] (fp32 CPU) from one pass of the compiled
    kernel's tiles (`--fast-attention`). The output is not torch's fused kernel's to the last bit."""
    module = kernel()
    note_taken("compiled")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    none = torch.empty((0, 2), dtype=torch.int64)
    ent, mx, top, _, out = module.query_stats(q, k, float(scale), int(topk), none, True, TILE_ELEMENTS, v)
    return out.view(*q.shape[:3], v.shape[-1]), (ent, mx, top)
