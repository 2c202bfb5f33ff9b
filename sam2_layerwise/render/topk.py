"""Top-k lists of rendered attention maps (`attn_topk/topk_*.txt`) and, on request, symlinks to them.

What is ranked: every map that was drawn (one per selected query, per head when asked, per decoder token for
image->token maps). Its score is the largest value in the map: the highest attention probability that one
key token receives (head mean unless the map is one head's; the mean per token when keys were pooled; for
image->token maps, the largest share of one image token's attention given to that decoder token). Maps are
sorted by score, highest first (ties by file name), and the first K are listed: `topk_all.txt` over all
maps and `topk_<kind>.txt` per attention kind.
"""

from __future__ import annotations

import math
import os
from pathlib import PurePosixPath

from sam2_layerwise.render.attention import Rendered
from sam2_layerwise.store import layout
from sam2_layerwise.store.atomic import atomic_write_bytes

HEADER = "rank\tscore\tlayer\tkind\tquery\thead\tpeak\tpath"


def ranked(rendered: list[Rendered]) -> list[Rendered]:
    """Highest score first, ties by path; NaN scores (maps without a finite value) last."""
    return sorted(rendered, key=lambda r: (math.isnan(r.map.score), -r.map.score if not math.isnan(r.map.score)
                                           else 0.0, r.path))


def _line(rank: int, r: Rendered) -> str:
    m = r.map
    head = "mean" if m.head is None else str(m.head)
    return f"{rank}\t{m.score:.6g}\t{m.layer_key}\t{m.kind}\t{m.label}\t{head}\t{m.peak}\t{r.path}"


def write_topk(rendered: list[Rendered], k: int, writer, *, symlink: bool = False) -> dict:
    """Write `attn_topk/topk_all.txt` and `attn_topk/topk_<kind>.txt` (k lines each, paths relative to the run
    directory); with `symlink`, `attn_topk/<kind>/<rank>__<name>.png` -> the listed picture (relative links),
    for every list including `all` (`attn_topk/all/`).
    Returns the summary `files` entry."""
    if k <= 0 or not rendered:
        return {}
    groups = {"all": ranked(rendered)}
    for kind in sorted({r.map.kind for r in rendered}):
        groups[kind] = [r for r in groups["all"] if r.map.kind == kind]
    lists, links = [], 0
    for kind, items in groups.items():
        top = items[:k]
        text = [f"# top {len(top)} of {len(items)} attention maps ({kind}) by score: the largest attention "
                "probability one key token receives in the map (see README, Top-k)", f"# {HEADER}"]
        text += [_line(i + 1, r) for i, r in enumerate(top)]
        rel = f"{layout.ATTN_TOPK}/topk_{layout.safe_name(kind)}.txt"
        atomic_write_bytes(("\n".join(text) + "\n").encode(), writer.path(rel))
        lists.append(rel)
        if symlink:
            for i, r in enumerate(top):
                link_rel = f"{layout.ATTN_TOPK}/{layout.safe_name(kind)}/{i + 1:03d}__{PurePosixPath(r.path).name}"
                link = writer.path(link_rel)
                target = os.path.relpath(r.path, start=str(PurePosixPath(link_rel).parent))
                try:
                    os.symlink(target, link)
                except OSError:  # file systems without symlinks: a copy of the picture
                    link.write_bytes(writer.path(r.path).read_bytes())
                links += 1
    out = {layout.ATTN_TOPK: lists}
    if symlink:
        out["attn_topk_links"] = links
    return out
