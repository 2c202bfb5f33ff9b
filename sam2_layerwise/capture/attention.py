"""The one place attention is recomputed: softmax(q·kᵀ·scale) in fp32, in chunks, never a whole map.

Everything else (statistics, selected rows, rendering from saved q/k) calls these functions, and the
capture checks them against the module's real output (`probs @ v` through the output projection).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from sam2_layerwise.capture import native

ProbsTransform = Callable[[torch.Tensor], torch.Tensor] | None

STAT_NAMES = ("entropy", "entropy_norm", "max_prob", "topk_mass")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def named_stats(entropy: torch.Tensor, max_prob: torch.Tensor, topk_mass: torch.Tensor, nk: int,
                shape: tuple | None = None) -> dict:
    """The four per-query statistics by name (`STAT_NAMES`), the normalised entropy being entropy / ln Nk;
    viewed as `shape` when given (a kernel's flat [G * heads, Nq] as [G, heads, Nq])."""
    stats = (entropy, entropy / (math.log(nk) if nk > 1 else 1.0), max_prob, topk_mass)
    return {name: t if shape is None else t.view(shape) for name, t in zip(STAT_NAMES, stats)}


def saved_scale(value) -> float | None:
    """An attention scale read back from a file (untrusted): the positive finite real number it is, else None
    (a string, a bool, a tensor of several elements, NaN, 0)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, transform: ProbsTransform = None) -> torch.Tensor:
    """Attention probabilities as the kernel used them.

    q: [..., Nq, d], k: [..., Nk, d] -> [..., Nq, Nk] fp32, rows sum to 1 (before `transform`).
    """
    return attention_scores_probs(q, k, scale, transform)[1]


def attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Scores q·kᵀ·scale fp32 [..., Nq, Nk], as every explicit kernel and recomputation takes them."""
    with torch.autocast(q.device.type, enabled=False):
        return torch.matmul(_fp32(q) * scale, _fp32(k).transpose(-1, -2))


def attention_scores_probs(q: torch.Tensor, k: torch.Tensor, scale: float, transform: ProbsTransform = None):
    """(scores q·kᵀ·scale, probabilities) fp32 [..., Nq, Nk]: `attention_probs` with the scores it took them from."""
    scores = attention_scores(q, k, scale)
    with torch.autocast(q.device.type, enabled=False):
        probs = torch.softmax(scores, dim=-1)
        return scores, transform(probs) if transform is not None else probs


# Tiles shared by `attention_rows` and kernels that compute attention explicitly (quantized softmax): both cut
# [G, h, Nq] the same way and run the same ops on the same tile, so the rows capture records are bit-identical
# to the rows the kernel multiplied with v. (A single-row matmul differs from a many-row one in the last bits,
# which is enough to flip a quantization step.)
TILE_ELEMENTS = 1 << 20


def row_tiles(G: int, h: int, nq: int, nk: int, tile_elements: int = TILE_ELEMENTS) -> list[tuple[int, int, int, int]]:
    """(g0, g1, r0, r1) tiles covering groups x query rows, at most `tile_elements` scores each (or one group
    row). A function of the shapes only."""
    per_group = h * nq * nk
    if per_group <= tile_elements:
        step = max(1, tile_elements // max(per_group, 1))
        return [(g0, min(G, g0 + step), 0, nq) for g0 in range(0, G, step)]
    rows = max(1, tile_elements // (h * nk))
    return [(g, g + 1, r0, min(nq, r0 + rows)) for g in range(G) for r0 in range(0, nq, rows)]


def attention_tile(q, k, v, scale: float, transform: ProbsTransform, tile: tuple[int, int, int, int],
                   stats_topk: int | None = None):
    """Probabilities [g, h, r, Nk] fp32 and out = probs @ v [g, h, r, d_v] fp32 of one tile of `row_tiles`; with
    `stats_topk` also `tile_statistics` of its rows ([g, h, r] each) as a third value. Float probabilities on CPU
    take them inside the softmax (`native.softmax_kernel`: torch's softmax to the bit, each row read once)."""
    g0, g1, r0, r1 = tile
    fused = (native.softmax_kernel() if stats_topk is not None and transform is None and q.device.type == "cpu"
             and k.shape[-2] > 0 else None)
    stats = None
    if fused is not None:
        native.note_taken("compiled")
        scores = attention_scores(q[g0:g1, :, r0:r1], k[g0:g1], scale)  # [g, h, r, Nk]
        nk = scores.shape[-1]
        probs, ent, mx, top = fused.softmax_stats(scores.reshape(-1, nk).contiguous(), min(stats_topk, nk))
        probs, stats = probs.view(scores.shape), named_stats(ent, mx, top, nk, scores.shape[:-1])
    else:
        scores, probs = attention_scores_probs(q[g0:g1, :, r0:r1], k[g0:g1], scale, transform)
        if stats_topk is not None:
            stats = tile_statistics(scores, probs, transform is not None, stats_topk)
    with torch.autocast(q.device.type, enabled=False):
        out = torch.matmul(probs, _fp32(v[g0:g1]))
    return (probs, out) if stats_topk is None else (probs, out, stats)


def tile_statistics(scores: torch.Tensor, probs: torch.Tensor, transformed: bool, topk: int) -> dict:
    """Per-query statistics of rows a kernel already computed (an explicitly tiled kernel's tile): no second
    q·kᵀ or exp. scores, probs: [..., Nk] fp32, probs = softmax(scores), or `transformed` probabilities (then the
    scores are not used). Returns `query_statistics`' four statistics, shaped [...]."""
    nk = probs.shape[-1]
    kk = min(topk, nk)
    lead = probs.shape[:-1]
    module = native.kernel() if not transformed and probs.device.type == "cpu" else None
    if module is not None:
        native.note_taken("compiled")
        ent, mx, top = module.probs_stats(scores.reshape(-1, nk).contiguous(), probs.reshape(-1, nk).contiguous(), kk)
        ent, mx, top = ent.view(lead), mx.view(lead), top.view(lead)
    else:
        native.note_taken("torch")
        ent = -torch.special.xlogy(probs, probs).sum(-1)
        if transformed:
            # the entropy of the row renormalised to sum 1, as the metrics take it (docs/metrics.md): a quantized
            # softmax sums to some s != 1, and H(p / s) = H(p) / s + ln s. A row quantized to all zeros is no
            # distribution: its entropy is undefined, not 0.
            total = probs.sum(-1)
            ent = torch.where(total > 0, ent / total + torch.log(total), math.nan)
        mx = probs.amax(-1)
        top = topk_sum(probs, kk) if kk else torch.zeros_like(mx)
    return named_stats(ent, mx, top, nk)


# Past this many key elements in all, gathering each pick's group (a copy of its keys and values per pick) costs
# more than taking the picks one at a time on views: a global block's 4 picks would copy 4 x 7 MiB of b+'s keys.
GATHER_ELEMENTS = 1 << 18


def rows_one_by_one(k: torch.Tensor, picks: list) -> bool:
    """Whether the selected rows of `picks` over keys k [G, h, Nk, d] are computed one pick at a time on views
    (large groups) rather than in one product over the gathered groups. A function of the shapes and picks only,
    so a recomputation with the same picks takes the same path and gives the same bits."""
    return len(picks) * k[0].numel() > GATHER_ELEMENTS


def attention_rows(q, k, v, scale, transform: ProbsTransform, picks: list[tuple[int, int]], tiled: bool = False):
    """Probabilities and outputs for selected queries.

    q, k, v: [G, h, N, d]; picks: (group, query index) pairs. With `tiled` the rows are computed in the
    tiles of `row_tiles`, as an explicitly tiled kernel computed them; otherwise row by row (cheaper): all picks
    in one batched product over their gathered groups, or (`rows_one_by_one`: large groups, memory attention's
    28,736 keys) one pick at a time on views of k and v.
    Returns probs [n, h, Nk] fp32 and out = probs @ v [n, h, d_v] fp32.
    """
    nk = k.shape[-2]
    if not picks:
        return q.new_zeros((0, q.shape[1], nk), dtype=torch.float32), q.new_zeros((0, q.shape[1], v.shape[-1]), dtype=torch.float32)
    if not tiled and rows_one_by_one(k, picks):
        rows = []
        for g, i in picks:
            p = attention_probs(q[g:g + 1, :, i:i + 1], k[g:g + 1], scale, transform)  # [1, h, 1, Nk]
            with torch.autocast(q.device.type, enabled=False):
                rows.append((p[0, :, 0], torch.matmul(p, _fp32(v[g:g + 1]))[0, :, 0]))
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    if not tiled:
        g = torch.tensor([p[0] for p in picks], device=q.device)
        i = torch.tensor([p[1] for p in picks], device=q.device)
        probs = attention_probs(q[g, :, i].unsqueeze(2), k[g], scale, transform)  # [n, h, 1, Nk]
        with torch.autocast(q.device.type, enabled=False):
            out = torch.matmul(probs, _fp32(v[g]))  # [n, h, 1, d_v]
        return probs[:, :, 0], out[:, :, 0]
    G, h, nq, _ = q.shape
    tiles = row_tiles(G, h, nq, nk)
    done: dict[tuple, tuple] = {}
    probs_rows, out_rows = [], []
    for g, i in picks:
        tile = next(t for t in tiles if t[0] <= g < t[1] and t[2] <= i < t[3])
        if tile not in done:
            done[tile] = attention_tile(q, k, v, scale, transform, tile)
        p, o = done[tile]
        probs_rows.append(p[g - tile[0], :, i - tile[2]])  # [h, Nk]
        out_rows.append(o[g - tile[0], :, i - tile[2]])  # [h, d_v]
    return torch.stack(probs_rows), torch.stack(out_rows)


def topk_sum(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the k largest values along the last axis; exact, and faster than a plain top-k on long rows.

    With the row cut into B blocks of B, the k largest values lie in the k blocks with the largest maxima
    (a block holding one of them has a maximum at least that large, and at most k-1 larger values exist), so
    the top-k runs over B maxima and then k*B candidates instead of B*B values. Sorted values, same sum.
    """
    n = x.shape[-1]
    block = math.isqrt(n)
    if n < 1024 or block * block != n or block <= k:
        return torch.topk(x, k, dim=-1).values.sum(-1)
    blocks = x.view(*x.shape[:-1], block, block)  # [..., blocks, block]
    idx = torch.topk(blocks.amax(-1), k, dim=-1).indices  # [..., k]
    cand = torch.gather(blocks, -2, idx.unsqueeze(-1).expand(*idx.shape, block))  # [..., k, block]
    return torch.topk(cand.flatten(-2), k, dim=-1).values.sum(-1)


def _stat_tiles(batch: int, nq: int, nk: int, tile_elements: int) -> list[tuple[int, int, int, int]]:
    """(b0, b1, r0, r1) tiles over [batch = groups x heads, Nq] with at most `tile_elements` scores each.
    One head per tile for long rows: a [rows, d] x [d, Nk] product per head runs ~2x faster on CPU than
    the same scores cut as [heads, few rows]."""
    if nq * nk <= tile_elements:
        step = max(1, tile_elements // (nq * nk))
        return [(b0, min(batch, b0 + step), 0, nq) for b0 in range(0, batch, step)]
    rows = max(1, tile_elements // nk)
    return [(b, b + 1, r0, min(nq, r0 + rows)) for b in range(batch) for r0 in range(0, nq, rows)]


def segment_sums(probs: torch.Tensor, segments: list[tuple[int, int]]) -> torch.Tensor:
    """probs [..., Nk] -> [..., S]: the mass on each key segment [start, stop) (memory frames, pointers)."""
    return torch.stack([probs[..., a:b].sum(-1) for a, b in segments], dim=-1)


def _covering(segments: list[tuple[int, int]], nk: int) -> bool:
    return segments[0][0] == 0 and segments[-1][1] == nk and all(a[1] == b[0] for a, b in zip(segments, segments[1:]))


def _disjoint(segments: list[tuple[int, int]] | None, nk: int) -> bool:
    """No segments, or sorted, disjoint key ranges inside [0, nk) (what the compiled kernel takes)."""
    if not segments:
        return True
    return all(0 <= a <= b <= nk for a, b in segments) and all(x[1] <= y[0] for x, y in zip(segments, segments[1:]))


def _segment_mass_fused(q, k, scale, segments) -> torch.Tensor:
    """softmax(q kᵀ·scale) summed per key segment for every query, by torch's own fused attention kernel with an
    indicator matrix as the values (padded to the head dim, so the fused CPU/GPU kernels take it: no score
    matrix is ever materialised). [G, h, Nq, S] fp32. Float probabilities only (no transform)."""
    from sam2_layerwise.capture.dispatch import ORIGINAL_SDPA

    G, h, nq, d = q.shape
    nk = k.shape[-2]
    ind = torch.zeros((nk, d), dtype=torch.float32, device=q.device)  # [Nk, d]: column s marks segment s
    for n, (a, b) in enumerate(segments):
        ind[a:b, n] = 1.0
    with torch.autocast(q.device.type, enabled=False):
        out = ORIGINAL_SDPA(_fp32(q), _fp32(k), ind.expand(G, h, nk, d), scale=scale)  # [G, h, Nq, d]
    return out[..., :len(segments)].contiguous()


def query_statistics(q, k, scale, transform: ProbsTransform = None, topk: int = 5, chunk_elements: int = 1 << 20,
                     segments: list[tuple[int, int]] | None = None, stats: bool = True):
    """Per-query statistics over the keys, for every query, computed tile by tile.

    q: [G, h, Nq, d], k: [G, h, Nk, d]. Returns a dict of [G, h, Nq] fp32 tensors:
    entropy (nats), entropy_norm (entropy / log Nk, in [0, 1]), max_prob, topk_mass (mass on the k largest keys).
    With `segments` (key ranges [start, stop), e.g. the memory frames and object pointers of a memory
    cross-attention) also `segment_mass` [G, h, Nq, S]: each query's attention mass per segment, from the same
    tiles (no second pass over the scores). With `stats=False` only `segment_mass` is computed.
    Float attention on CPU goes through the compiled kernel (`native`: one q·kᵀ per L2-sized tile, no copies of
    the scores); otherwise segment mass alone over covering segments goes through torch's fused kernel
    (`_segment_mass_fused`), and everything else tile by tile in torch ops.
    A tile holds at most `chunk_elements` scores; two tile buffers are the extra memory (8 MiB by default).
    """
    G, h, nq, d = q.shape
    nk = k.shape[-2]
    compiled = transform is None and q.device.type == "cpu" and _disjoint(segments, nk) and native.kernel() is not None
    if (segments and not stats and transform is None and len(segments) <= d and _covering(segments, nk)
            and not compiled):
        return {"segment_mass": _segment_mass_fused(q, k, scale, segments)}
    kk = min(topk, nk)
    B = G * h
    log_nk = math.log(nk) if nk > 1 else 1.0
    if compiled:
        with torch.autocast("cpu", enabled=False):
            found, seg = native.query_stats(_fp32(q), _fp32(k), scale, kk, segments, stats)
        out = {}
        if found is not None:
            out = named_stats(*found, nk, (G, h, nq))
        if seg is not None:
            out["segment_mass"] = seg.view(G, h, nq, len(segments))
        return out
    native.note_taken("torch")
    tiles = _stat_tiles(B, nq, nk, chunk_elements)
    want = stats
    stats = {name: torch.empty((B, nq), dtype=torch.float32, device=q.device) for name in (STAT_NAMES if want else ())}
    seg = torch.empty((B, nq, len(segments)), dtype=torch.float32, device=q.device) if segments else None
    onehot, covers = None, False
    if seg is not None:  # key -> segment indicator [Nk, S]: segment sums as one small matrix product
        onehot = torch.zeros((nk, len(segments)), dtype=torch.float32, device=q.device)
        for n, (a, b) in enumerate(segments):
            onehot[a:b, n] = 1.0
        covers = bool((onehot.sum(-1) == 1).all())
    biggest = max((b1 - b0) * (r1 - r0) * nk for b0, b1, r0, r1 in tiles)
    # Tile buffers reused for every tile: a fresh multi-MiB tensor per tile costs page faults that take
    # about as long as the arithmetic.
    s_buf = torch.empty(biggest, dtype=torch.float32, device=q.device)
    e_buf = torch.empty(biggest, dtype=torch.float32, device=q.device) if transform is None else None
    with torch.autocast(q.device.type, enabled=False):
        qs = (_fp32(q) * scale).reshape(B, nq, d)  # [B, Nq, d]
        kt = _fp32(k).transpose(-1, -2).reshape(B, d, nk)  # [B, d, Nk], contiguous
        for b0, b1, r0, r1 in tiles:
            shape = (b1 - b0, r1 - r0, nk)
            n = math.prod(shape)
            scores = torch.bmm(qs[b0:b1, r0:r1], kt[b0:b1], out=s_buf[:n].view(shape))  # [b, r, Nk]
            if transform is None:
                # One exp per score: t = s - max, e = exp(t), z = sum e, p = e / z, so
                # H = -sum p log p = log z - sum(e * t) / z, max p = 1 / z, top-k mass = sum topk(e) / z.
                # (a key at -inf: t = -FLT_MAX, not -inf, so that e t = 0, not NaN; NaN stays NaN)
                t = scores.sub_(scores.amax(-1, keepdim=True)).clamp_(min=torch.finfo(torch.float32).min)
                e = torch.exp(t, out=e_buf[:n].view(shape))
                parts = torch.matmul(e, onehot) if seg is not None else None  # [b, r, S]
                z = parts.sum(-1) if covers else e.sum(-1)
                if seg is not None:
                    seg[b0:b1, r0:r1] = parts / z.unsqueeze(-1)
                if not want:
                    continue
                ent = torch.log(z) - torch.einsum("...j,...j->...", e, t) / z
                mx = 1.0 / z
                top = topk_sum(e, kk) / z if kk else torch.zeros_like(z)
            else:
                p = transform(torch.softmax(scores, -1))
                if seg is not None:
                    seg[b0:b1, r0:r1] = torch.matmul(p, onehot)
                if not want:
                    continue
                found = tile_statistics(scores, p, True, kk)
                ent, mx, top = found["entropy"], found["max_prob"], found["topk_mass"]
            stats["entropy"][b0:b1, r0:r1] = ent
            stats["entropy_norm"][b0:b1, r0:r1] = ent / log_nk
            stats["max_prob"][b0:b1, r0:r1] = mx
            stats["topk_mass"][b0:b1, r0:r1] = top
    out = {name: t.view(G, h, nq) for name, t in stats.items()}
    if seg is not None:
        out["segment_mass"] = seg.view(G, h, nq, len(segments))
    return out


def pool_keys(probs: torch.Tensor, block_hw: tuple[int, int] | None, max_tokens: int):
    """Sum-pool the key axis so at most `max_tokens` keys remain; the result still sums to 1 per row.

    probs: [..., Nk]. With a key grid block (bh, bw) (Nk == bh*bw) keys are pooled over f x f spatial
    cells; otherwise over runs of f consecutive keys. Returns (pooled [..., Nk'], info dict or None).
    """
    nk = probs.shape[-1]
    if nk <= max_tokens:
        return probs, None
    lead = probs.shape[:-1]
    if block_hw is not None and block_hw[0] * block_hw[1] == nk:
        bh, bw = block_hw
        f = 1
        while -(-bh // f) * -(-bw // f) > max_tokens:
            f += 1
        ph, pw = -(-bh // f) * f, -(-bw // f) * f
        grid = probs.reshape(-1, 1, bh, bw)
        grid = torch.nn.functional.pad(grid, (0, pw - bw, 0, ph - bh))
        pooled = torch.nn.functional.avg_pool2d(grid, f) * (f * f)  # [n, 1, ph/f, pw/f]
        info = {"op": "sum", "factor": f, "from_hw": [bh, bw], "pooled_hw": [ph // f, pw // f],
                "note": f"keys summed over {f}x{f} token cells; rows still sum to 1"}
        return pooled.reshape(*lead, -1), info
    f = -(-nk // max_tokens)
    padded = torch.nn.functional.pad(probs.reshape(-1, nk), (0, -(-nk // f) * f - nk))
    pooled = padded.reshape(padded.shape[0], -1, f).sum(-1)
    info = {"op": "sum", "factor": f, "from_keys": nk, "pooled_keys": pooled.shape[-1],
            "note": f"runs of {f} consecutive keys summed; rows still sum to 1"}
    return pooled.reshape(*lead, -1), info
