"""Row-wise comparison of two attention distributions: full precision p (FP) and quantized q (Q).

Every function takes rows over the keys as the last axis — p, q: [..., N] — and returns one value per row,
[...] fp32 (inputs of another float dtype are computed in fp32). Two views of a row are used, on purpose:

- Distribution metrics (JS divergence, entropy) see each row renormalised to sum 1. A quantized softmax does
  not sum exactly to 1 (small probabilities rounded to 0, large ones to a step), and without renormalising a
  row's lost mass would show up as divergence from itself. A row with no mass at all (every probability
  quantized to 0) is not a distribution: its JS divergence and entropy are NaN.
- Mass metrics (top-k mass, mass Q keeps on FP's top k) see the raw rows: the weights the kernel really
  multiplied with v, lost mass included.

Top-k sets are taken on the raw rows; k larger than N means N. Where p ties at its k-th value (rare in an
fp32 softmax) FP's top-k set T_k(p) holds an unspecified one of the tied keys, the same in every function.
Quantized rows tie often (every value is one of a few codes), so Q's ties are resolved in FP's favour: of
the equally valid top-k sets of q, T_k(q) is the one that shares most keys with T_k(p). Identical rows
therefore always overlap exactly 1, whatever the ties; a row with fewer than k non-zero values leaves its
remaining top-k places to FP's keys (the mass metrics show what those places hold).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

LN2 = math.log(2.0)
TINY = torch.finfo(torch.float32).tiny
_LOG1P_FLOOR = -1.0 + 2.0**-24  # the float32 just above -1: ln(1 + x) >= ln(2^-24)

# pair_metrics's names, in the order it returns them.
PAIR_METRICS = ("js", "entropy_norm_fp", "entropy_norm_q", "entropy_norm_delta", "topk_mass_fp", "topk_mass_q",
                "topk_overlap", "q_mass_on_fp_topk")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _check_pair(p: torch.Tensor, q: torch.Tensor) -> None:
    if p.shape != q.shape:
        raise ValueError(f"FP and Q attention rows differ in shape: {tuple(p.shape)} vs {tuple(q.shape)}")
    if p.dim() == 0 or p.shape[-1] == 0:
        raise ValueError(f"attention rows need a key axis with at least one key, got shape {tuple(p.shape)}")


def _k(k: int, n: int) -> int:
    if k < 1:
        raise ValueError(f"top-k needs k >= 1, got {k}")
    return min(k, n)


def _renormalise(p: torch.Tensor) -> torch.Tensor:
    """p / sum(p) per row (a new tensor); rows summing to 0 become NaN."""
    return p / p.sum(-1, keepdim=True)


def _js_bits(pn: torch.Tensor, qn: torch.Tensor) -> torch.Tensor:
    """JS divergence in bits of rows that already sum to 1.

    Per key, with m = (p + q)/2 and d = (p - q)/(p + q): p·ln(p/m) + q·ln(q/m) = p·ln(1 + d) + q·ln(1 - d).
    Written with log1p the terms are exactly 0 where p == q, and near-identical rows keep their small
    divergence accurately (no ln p − ln m cancellation). ln(1 ± d) is floored at ln(2^-24) ≈ −16.6: that makes
    0·ln 0 = 0 where one side is 0 and keeps a key with p/q below ~3e-8 (where d rounds to −1) finite, at an
    error below 4e-7 bits per row.
    """
    s = pn + qn  # [..., N]
    s.clamp_min_(TINY)  # keys where both are 0: d = 0 / tiny = 0
    d = torch.sub(pn, qn).div_(s)  # [..., N], in [-1, 1]
    terms = torch.clamp_min(d, _LOG1P_FLOOR, out=s).log1p_().mul_(pn)  # s is free again
    d.neg_().clamp_min_(_LOG1P_FLOOR).log1p_().mul_(qn)
    terms += d
    return (terms.sum(-1) * (0.5 / LN2)).clamp_(0.0, 1.0)


def _entropy_nats(pn: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """-Σ p·ln p of rows that sum to 1; 0·ln 0 = 0 (p clamped to the smallest normal float inside the log)."""
    return -torch.log(torch.clamp_min(pn, TINY, out=out), out=out).mul_(pn).sum(-1)


def _normalise_entropy(h: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return torch.where(h.isnan(), h, torch.zeros_like(h))
    return (h / math.log(n)).clamp_(0.0, 1.0)


# Row chunk of the CPU loops: the dozen elementwise passes over a chunk stay in cache (a 4M-score tile of
# pair_metrics takes ~30% less CPU time in chunks of 256K scores than whole). On a GPU a tile is one chunk.
CHUNK_ELEMENTS = 1 << 18


def _by_rows(fn, *rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """fn applied to row chunks of [..., N] tensors, its results put back together.

    fn takes [r, N] fp32 tensors and returns a dict of [r] tensors; the result holds them with the leading
    shape [...] of the inputs. Chunks are converted to fp32 one at a time (a bf16 tile is never copied whole).
    """
    lead, n = rows[0].shape[:-1], rows[0].shape[-1]
    flat = [x.reshape(-1, n) for x in rows]  # [R, N]
    total = flat[0].shape[0]
    step = max(1, CHUNK_ELEMENTS // n) if flat[0].device.type == "cpu" else max(total, 1)
    if step >= total:
        parts = fn(*map(_fp32, flat))
    else:
        parts = {}
        for r0 in range(0, total, step):
            for name, t in fn(*(_fp32(x[r0:r0 + step]) for x in flat)).items():
                if name not in parts:
                    parts[name] = t.new_empty(total)
                parts[name][r0:r0 + step] = t
    return {name: t.reshape(lead) for name, t in parts.items()}


def _block_size(n: int, k: int) -> int | None:
    """A divisor b of n near sqrt(n) for `_top`'s blocks, or None where a plain top-k is as fast (measured on
    CPU: 2x faster at 4096 keys, slower at 1024)."""
    if n < 4096:
        return None
    for b in range(math.isqrt(n), 1, -1):
        if n % b == 0:
            return b if b > k and n // b > k and b * b * 4 >= n else None
    return None


def _top(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row, sorted descending, and their keys: x [r, N] -> ([r, k], [r, k]).

    Every function takes T_k(p) from here. Exact, and faster than torch.topk on long rows: with the row
    cut into blocks, the k largest values lie in the k blocks with the largest maxima (a block holding one of
    them has a maximum at least as large, and fewer than k larger values exist), so the top-k runs over the
    block maxima and then over k blocks. Where values tie at the k-th place the key kept is unspecified.
    """
    n = x.shape[-1]
    b = _block_size(n, k)
    if b is None:
        return torch.topk(x, k, dim=-1)
    blocks = x.reshape(x.shape[0], n // b, b)  # [r, blocks, b]
    best = torch.topk(blocks.amax(-1), k, dim=-1).indices  # [r, k] blocks
    cand = torch.gather(blocks, 1, best.unsqueeze(-1).expand(-1, -1, b))  # [r, k, b]
    values, at = torch.topk(cand.flatten(1), k, dim=-1)  # [r, k] over the k*b candidates
    keys = torch.gather(best, 1, at // b) * b + at % b  # [r, k] key indices in the row
    return values, keys


@torch.no_grad()
def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence, log base 2, of the renormalised rows: [..., N] x2 -> [...] fp32 in [0, 1].

    JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m), m = (p + q)/2; symmetric; exactly 0.0 for identical rows, exactly
    1.0 for rows with disjoint support; 0·log 0 = 0. NaN for a row with zero total mass.
    """
    _check_pair(p, q)
    return _by_rows(lambda p, q: {"js": _js_bits(_renormalise(p), _renormalise(q))}, p, q)["js"]


def _check_rows(p: torch.Tensor) -> None:
    if p.dim() == 0 or p.shape[-1] == 0:
        raise ValueError(f"attention rows need a key axis with at least one key, got shape {tuple(p.shape)}")


@torch.no_grad()
def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the renormalised rows, -Σ p·ln p: [..., N] -> [...] fp32 in [0, ln N]."""
    _check_rows(p)
    return _by_rows(lambda p: {"h": _entropy_nats(_renormalise(p)).clamp_(min=0.0)}, p)["h"]


def entropy_norm(p: torch.Tensor) -> torch.Tensor:
    """Entropy / ln N of the renormalised rows (N = number of keys): [..., N] -> [...] fp32 in [0, 1].

    1 for a uniform row, 0 for a one-hot row; 0 when N = 1.
    """
    return _normalise_entropy(entropy(p), p.shape[-1])


@torch.no_grad()
def topk_mass(p: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the k largest values of each raw row: [..., N] -> [...] fp32 (min(k, N) values)."""
    _check_rows(p)
    kk = _k(k, p.shape[-1])
    return _by_rows(lambda p: {"mass": _top(p, kk)[0].sum(-1)}, p)["mass"]


def _overlap_and_mass(q: torch.Tensor, p_idx: torch.Tensor, q_top: torch.Tensor, k: int):
    """Top-k overlap (Q's ties resolved in FP's favour) and the mass q puts on FP's top-k keys.

    q: [r, N] raw; p_idx: [r, k] FP's top-k keys; q_top: [r, k] q's k largest values, sorted descending.
    With t = q's k-th largest value, every valid top-k set of q holds the g keys with q > t (all among q_top)
    and k - g of the keys with q == t, so the best one shares |T_k(p) ∩ {q > t}| + min(k - g, |T_k(p) ∩ {q == t}|)
    keys with T_k(p).
    """
    q_at_p = torch.gather(q, -1, p_idx)  # [r, k]
    t = q_top[..., -1:]  # [r, 1]
    above = (q_top > t).sum(-1)  # g
    shared = (q_at_p > t).sum(-1) + torch.minimum(k - above, (q_at_p == t).sum(-1))
    return shared.float() / k, q_at_p.sum(-1)


@torch.no_grad()
def topk_overlap(p: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """|T_k(p) ∩ T_k(q)| / k over the raw rows: [..., N] x2 -> [...] fp32 in [0, 1].

    T_k(p): `torch.topk`'s k largest keys of p. T_k(q): of the equally valid top-k sets of q (q ties at its
    k-th value), the one sharing most keys with T_k(p). Identical rows give exactly 1. Not symmetric in p, q
    when both tie. k larger than N means N.
    """
    _check_pair(p, q)
    kk = _k(k, p.shape[-1])
    overlap = lambda p, q: {"overlap": _overlap_and_mass(q, _top(p, kk)[1], _top(q, kk)[0], kk)[0]}  # noqa: E731
    return _by_rows(overlap, p, q)["overlap"]


@torch.no_grad()
def mass_on_topk(p: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """The raw mass q puts on p's top-k keys (T_k(p) as in `topk_overlap`): [..., N] x2 -> [...] fp32."""
    _check_pair(p, q)
    kk = _k(k, p.shape[-1])
    return _by_rows(lambda p, q: {"mass": torch.gather(q, -1, _top(p, kk)[1]).sum(-1)}, p, q)["mass"]


def _pair_rows(p: torch.Tensor, q: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """`pair_metrics` of one chunk: p, q [r, N] fp32 -> {name: [r]}."""
    n = p.shape[-1]
    p_top, p_idx = _top(p, k)  # [r, k]
    q_top = _top(q, k)[0]  # [r, k], sorted descending
    overlap, q_on_p = _overlap_and_mass(q, p_idx, q_top, k)
    pn, qn = _renormalise(p), _renormalise(q)  # [r, N]
    buf = torch.empty_like(pn)
    ent_p = _normalise_entropy(_entropy_nats(pn, out=buf).clamp_(min=0.0), n)
    ent_q = _normalise_entropy(_entropy_nats(qn, out=buf).clamp_(min=0.0), n)
    del buf
    return {
        "js": _js_bits(pn, qn),
        "entropy_norm_fp": ent_p,
        "entropy_norm_q": ent_q,
        "entropy_norm_delta": ent_q - ent_p,
        "topk_mass_fp": p_top.sum(-1).clamp_(max=1.0),  # a softmax row: past 1 by rounding only
        "topk_mass_q": q_top.sum(-1),
        "topk_overlap": overlap,
        "q_mass_on_fp_topk": q_on_p,
    }


@torch.no_grad()
def pair_metrics(p: torch.Tensor, q: torch.Tensor, k: int = 5) -> dict[str, torch.Tensor]:
    """Every FP-vs-Q row metric at once: p, q [..., N] -> {name: [...] fp32}, names as in `PAIR_METRICS`.

    js: `js_divergence`; entropy_norm_fp / _q: `entropy_norm` of p / q, entropy_norm_delta = Q − FP;
    topk_mass_fp / _q: `topk_mass`; topk_overlap: `topk_overlap`; q_mass_on_fp_topk: `mass_on_topk`.
    The same values as the single functions, from one top-k and one renormalisation per side. Made for tiles
    such as [rows, heads, N]: on CPU it works through chunks of `CHUNK_ELEMENTS` scores, so besides the
    inputs and outputs it holds a few chunk-sized buffers; on a GPU, a few tile-sized ones.
    """
    _check_pair(p, q)
    kk = _k(k, p.shape[-1])
    return _by_rows(lambda p, q: _pair_rows(p, q, kk), p, q)


def _dims(dim: int | Sequence[int]) -> tuple[int, ...]:
    return (dim,) if isinstance(dim, int) else tuple(dim)


def sq_err_parts(ref: torch.Tensor, x: torch.Tensor, dim: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖x − ref‖², ‖ref‖²) summed over `dim`, as fp64 tensors of the remaining shape.

    Partial sums for `relative_error` over many tiles: add the parts of every tile (fp64, so hundreds of
    millions of terms add up without loss), then `relative_error_from_parts`.
    """
    if ref.shape != x.shape:
        raise ValueError(f"reference and compared tensors differ in shape: {tuple(ref.shape)} vs {tuple(x.shape)}")
    ref, x = _fp32(ref), _fp32(x)
    dims = _dims(dim)
    diff = x - ref
    return (diff * diff).sum(dims).double(), (ref * ref).sum(dims).double()


def relative_error_from_parts(err_sq: torch.Tensor, ref_sq: torch.Tensor) -> torch.Tensor:
    """sqrt(err_sq / ref_sq) as fp32; where ref_sq == 0: 0 if err_sq == 0, else inf."""
    ratio = torch.sqrt(err_sq / ref_sq.clamp_min(torch.finfo(torch.float64).tiny))
    zero_ref = torch.where(err_sq == 0, torch.zeros_like(ratio), torch.full_like(ratio, math.inf))
    return torch.where(ref_sq == 0, zero_ref, ratio).float()


def relative_error(ref: torch.Tensor, x: torch.Tensor, dim: int | Sequence[int]) -> torch.Tensor:
    """‖x − ref‖₂ / ‖ref‖₂ over `dim`: fp32 of the remaining shape.

    E.g. per head of q/k/v: ref, x [G, h, N, d], dim (0, 2, 3) -> [h]. Where ‖ref‖ = 0: 0 if x == ref, else inf.
    """
    return relative_error_from_parts(*sq_err_parts(ref, x, dim))


def _json_floats(v):
    """Floats (or nested lists of them) with NaN and ±inf as None: what JSON can hold."""
    if isinstance(v, list):
        return [_json_floats(x) for x in v]
    return v if math.isfinite(v) else None


def summarise(values: torch.Tensor, dim: int = 0) -> dict[str, list]:
    """Mean, 95th percentile and maximum over `dim` (the queries), NaN values left out.

    values: e.g. [queries, heads] -> {"mean", "p95", "max": per-head lists of float (None where a head has no
    defined value), "undefined": per-head counts of NaN values (rows without a distribution)}. Other shapes
    give nested lists over the remaining dims. p95: `torch.quantile`'s default linear interpolation between
    the two nearest ranks (numpy.percentile's default), computed in fp64.
    """
    v = values.double().movedim(dim, -1)  # [..., queries]
    nan = v.isnan()
    undefined = nan.sum(-1)
    if v.shape[-1] == 0:
        empty = torch.full(v.shape[:-1], math.nan, dtype=torch.float64)
        mean = p95 = top = empty
    else:
        mean = v.nanmean(-1)
        p95 = torch.nanquantile(v, 0.95, dim=-1)
        top = v.masked_fill(nan, -math.inf).amax(-1)
        top = torch.where(undefined == v.shape[-1], torch.full_like(top, math.nan), top)

    def listed(t: torch.Tensor):
        return _json_floats(t.tolist())

    return {"mean": listed(mean), "p95": listed(p95), "max": listed(top), "undefined": undefined.tolist()}
