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
import math
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


def _build_dir(source: Path = SOURCE, cflags: list[str] = CFLAGS, stem: str = "sam2_layerwise_query_stats"):
    key = hashlib.sha256(source.read_bytes())
    key.update(f"{torch.__version__}|{sys.version}|{platform.machine()}|{cflags}".encode())
    digest = key.hexdigest()[:16]
    return f"{stem}_{digest}", ext_cache() / digest


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


def _build(source: Path = SOURCE, cflags: list[str] = CFLAGS, stem: str = "sam2_layerwise_query_stats",
           what: str = "the statistics kernel"):
    name, where = _build_dir(source, cflags, stem)
    so = where / f"{name}.so"
    if so.is_file():  # built before: import it (cpp_extension.load would run ninja again to check)
        try:
            return _import(name, so)
        except ImportError:
            pass  # a half-written or foreign file: build it again
    where.mkdir(parents=True, exist_ok=True)
    log.info("compiling %s once (about a minute) into %s", what, where)
    noise = io.StringIO()  # the compiler's output: shown only when the build fails
    try:
        with redirect_stdout(noise), redirect_stderr(noise), _ninja_on_path():
            from torch.utils import cpp_extension

            return cpp_extension.load(name=name, sources=[str(source)], build_directory=str(where),
                                      extra_cflags=cflags, extra_ldflags=["-fopenmp"], verbose=False)
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


# -- torch's CPU flash attention with the statistics taken on the way (csrc/flash_stats.cpp) -----------------------
FLASH_SOURCE = Path(__file__).with_name("csrc") / "flash_stats.cpp"
# The vector width decides the order of torch's lane sums, so the kernel is built for the capability ATen runs
# (its own CMake flags for those kernels) and without contraction beyond what torch's build does.
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
               "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}
FLASH_CFLAGS = ["-O2", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math"]
# Probe shapes (G, heads, Nq, d, Nk): each query split (32 / 64 / 256 rows), key tails off the vector width,
# several key blocks, a qkv-split layout; all must match torch's kernel bit for bit before the kernel is used.
FLASH_PROBES = ((3, 2, 64, 56, 64), (2, 3, 196, 56, 196), (1, 2, 770, 24, 1100), (2, 4, 49, 16, 4099),
                (1, 1, 200, 8, 7))
_flash_state: dict[str, object] = {}


def _flash_probe(module) -> str | None:
    """None when `module` gives torch's own output (values and layout) on every probe; else what differed."""
    from sam2_layerwise.capture.dispatch import ORIGINAL_SDPA

    gen = torch.Generator().manual_seed(0)
    for G, h, nq, d, nk in FLASH_PROBES:
        if nq == nk:  # SAM 2's layout: q, k, v as strided views of one qkv projection
            qkv = torch.randn(G, nq, 3, h, d, generator=gen) * 3
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        else:
            q, k, v = (torch.randn(G, h, n, d, generator=gen) * 3 for n in (nq, nk, nk))
        ref = ORIGINAL_SDPA(q, k, v)
        out = module.flash_stats(q, k, v, -1.0, 5)[0]
        if not torch.equal(out, ref) or out.stride() != ref.stride():
            return f"differs from torch's kernel on q {list(q.shape)}, k {list(k.shape)}"
    return None


# Softmax probe rows (rows, keys): below, at and off the vector width, a short and a long row, several tasks.
SOFTMAX_PROBES = ((3, 1), (5, 7), (4, 16), (3, 33), (64, 196), (9, 513), (40, 4096), (2, 4099))


def same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit the same float32 values, NaN where the other has NaN (whatever its payload: torch's own softmax
    gives different NaN bits to the same row depending on the rows around it)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.masked_fill(nan, 0).view(torch.int32),
                                                       b.masked_fill(nan, 0).view(torch.int32))


def _softmax_probe(module) -> str | None:
    """None when `module.softmax_stats` gives torch.softmax's own probabilities on every probe (random rows, a
    sharp row, a constant row, rows with -inf, inf and NaN scores: `same_floats`); else what differed."""
    gen = torch.Generator().manual_seed(1)
    for rows, nk in SOFTMAX_PROBES:
        s = torch.randn(rows, nk, generator=gen) * 4
        s[0] *= 50
        if rows > 2:
            s[1] = 0.5
            s[2, ::3] = -math.inf
        if rows > 4:
            s[3, nk // 2] = math.inf
            s[4, 0] = math.nan
        if not same_floats(module.softmax_stats(s, 5)[0], torch.softmax(s, -1)):
            return f"differs from torch.softmax on [{rows}, {nk}] scores"
    return None


def flash_kernel():
    """The compiled flash-attention-with-statistics module when it reproduces torch's CPU flash attention bit for
    bit in this process (built for ATen's CPU capability, checked on `FLASH_PROBES` once), else None (said once in
    the log: the statistics then take a second pass, `query_stats`). None too on the `torch` path."""
    if mode() == "torch" or kernel() is None:
        return None
    with _lock:
        if "module" not in _flash_state:
            module, reason = None, None
            try:
                capability = torch.backends.cpu.get_cpu_capability()
                flags = CAPABILITY_FLAGS.get(capability)
                if flags is None:
                    raise KernelUnavailable(f"CPU capability {capability} is not one it is built for")
                module = _build(FLASH_SOURCE, FLASH_CFLAGS + flags, "sam2_layerwise_flash_stats",
                                "the flash attention statistics kernel")
                reason = _flash_probe(module)
            except Exception as exc:
                reason = str(exc)[:2000] or type(exc).__name__
            if reason is not None:
                module = None
                log.info("statistics of float attention take a second pass over the scores (%s)",
                         reason.splitlines()[0][:300])
            _flash_state["module"], _flash_state["reason"] = module, reason
        return _flash_state["module"]


def softmax_kernel():
    """The flash module when its `softmax_stats` gives torch.softmax's probabilities bit for bit in this process
    (checked on `SOFTMAX_PROBES` once), else None: a tiled kernel's statistics then take `probs_stats`."""
    module = flash_kernel()
    if module is None:
        return None
    with _lock:
        if "softmax" not in _flash_state:
            try:
                reason = _softmax_probe(module)
            except Exception as exc:  # a module without the function, a failing check: the second read serves
                reason = str(exc)[:300] or type(exc).__name__
            if reason is not None:
                log.info("statistics of explicitly tiled attention take a second read of its tiles (%s)", reason)
            _flash_state["softmax"] = module if reason is None else None
        return _flash_state["softmax"]


def flash_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, topk: int):
    """torch's fused CPU attention output for q, k, v [G, h, N, d] (fp32), bit for bit, and the statistics
    (entropy, max_prob, topk_mass) [G, h, Nq] of every query from the same tiles. Callers check `flash_usable`."""
    note_taken("compiled")
    out, ent, mx, top = flash_kernel().flash_stats(q, k, v, -1.0 if scale is None else float(scale), int(topk))
    return out, (ent, mx, top)


def flash_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether torch would run this call through its CPU flash kernel the way `flash_stats` repeats it: fp32 CPU
    tensors with no grad, no autocast, full-precision float32 products (no oneDNN reduced-precision path), and
    torch's own backend choice being flash attention."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in (q, k, v)):
        return False
    if torch.is_autocast_enabled("cpu") or torch.get_float32_matmul_precision() != "highest":
        return False
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if getattr(mkldnn, "fp32_precision", "none") not in ("none", "ieee"):
        return False
    module = flash_kernel()
    if module is None or not module.usable(q, k, v):
        return False
    from torch.nn.attention import SDPBackend

    return torch._fused_sdp_choice(q, k, v) == int(SDPBackend.FLASH_ATTENTION.value)
