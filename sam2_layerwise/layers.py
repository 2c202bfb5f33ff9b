"""Layer selection: names, globs, comma lists and inclusive ranges (`image_encoder_trunk_blocks_0:23`)."""

from __future__ import annotations

import difflib
import fnmatch
import re

from sam2_layerwise.errors import InputError

_RANGE = re.compile(r"^(?P<prefix>.*?)(?P<a>\d+):(?P<b>\d+)(?P<suffix>\D.*)?$")


def expand(spec: str) -> list[str]:
    """`a_0:2,b*` -> ['a_0', 'a_1', 'a_2', 'b*'] (fnmatch patterns)."""
    out = []
    for part in (s.strip() for s in spec.split(",")):
        if not part:
            continue
        m = _RANGE.match(part)
        if m:
            a, b = int(m["a"]), int(m["b"])
            if b < a:
                raise InputError(f"range {a}:{b} runs backwards", flag="--layers", value=spec)
            out += [f"{m['prefix']}{i}{m['suffix'] or ''}" for i in range(a, b + 1)]
        else:
            out.append(part)
    if not out:
        raise InputError("is empty", flag="--layers", value=spec)
    return out


def select(keys: list[str], spec: str | None, flag: str = "--layers") -> list[str]:
    """The keys (in their order) matched by `spec`; every pattern must match at least one key."""
    if spec is None or spec.strip() in ("", "all", "*"):
        return list(keys)
    patterns = expand(spec)
    chosen = set()
    for pat in patterns:
        hits = [k for k in keys if fnmatch.fnmatchcase(k, pat)]
        if not hits:
            close = difflib.get_close_matches(pat, keys, n=3, cutoff=0.6)
            hint = f"; close: {', '.join(close)}" if close else f"; layers look like {keys[0]}" if keys else ""
            raise InputError(f"'{pat}' matches no layer{hint}", flag=flag, value=spec)
        chosen.update(hits)
    return [k for k in keys if k in chosen]


def attention_layer_keys(model, image_mode: bool = False) -> list[str]:
    """Layer keys of every attention module, in module order (Hiera attention under its block's key).
    With `image_mode`, only those the image predictor runs (memory attention runs in video mode only)."""
    keys = []
    for name, module in model.named_modules():
        if image_mode and name.startswith("memory_attention"):
            continue
        cls = type(module).__name__
        if cls == "MultiScaleAttention":
            keys.append(name.rsplit(".", 1)[0].replace(".", "_"))
        elif cls in ("Attention", "RoPEAttention"):
            keys.append(name.replace(".", "_"))
    return keys
