"""Layer selection: names, globs, comma lists and inclusive ranges (`image_encoder_trunk_blocks_0:23`)."""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass

from sam2_layerwise.errors import InputError

_RANGE = re.compile(r"^(?P<prefix>.*?)(?P<a>\d+):(?P<b>\d+)(?P<suffix>\D.*)?$", re.ASCII)
_DIGITS = re.compile(r"\d+", re.ASCII)
_HUGE = 10**18  # no model has this many layers; longer bounds compare as this (int() refuses > 4300 digits)


@dataclass(frozen=True)
class LayerRange:
    """An inclusive range `prefix{a..b}suffix` (prefix and suffix are fnmatch patterns). Matched against the
    real keys, never enumerated, so `blocks_0:999999999999` costs what `blocks_0:3` does."""

    text: str  # as the user wrote it, e.g. `blocks_0:11`
    prefix: str
    a: int
    b: int
    suffix: str
    bounds: str = ""  # `0:11`, the digits as written (a bound of more than 18 digits is kept as _HUGE)

    def name(self, n: int) -> str:
        return f"{self.prefix}{n}{self.suffix}"

    def numbers(self, key: str) -> set[int]:
        """The n in [a, b] for which `key` matches `prefix + str(n) + suffix`."""
        found = set()
        for run in _DIGITS.finditer(key):
            for i in range(run.start(), run.end()):
                # str(n) has no leading zeros: a "0" is a number on its own only
                stop = i + 1 if key[i] == "0" else min(run.end(), i + 18)
                for j in range(i + 1, stop + 1):
                    n = int(key[i:j])
                    if self.a <= n <= self.b and fnmatch.fnmatchcase(key[:i], self.prefix) \
                            and fnmatch.fnmatchcase(key[j:], self.suffix):
                        found.add(n)
        return found


def _bound(digits: str) -> int:
    return int(digits) if len(digits) <= 18 else _HUGE


def _shown(digits: str) -> str:
    return digits if len(digits) <= 18 else f"{digits[:6]}...({len(digits)} digits)"


def expand(spec: str, flag: str = "--layers") -> list[str | LayerRange]:
    """`a_0:2,b*` -> [LayerRange('a_', 0, 2, ''), 'b*']: fnmatch patterns and inclusive ranges, in order."""
    out: list[str | LayerRange] = []
    for part in (s.strip() for s in spec.split(",")):
        if not part:
            continue
        m = _RANGE.match(part)
        if m:
            a, b = _bound(m["a"]), _bound(m["b"])
            if b < a:
                raise InputError(f"range {_shown(m['a'])}:{_shown(m['b'])} runs backwards", flag=flag, value=spec)
            out.append(LayerRange(part, m["prefix"], a, b, m["suffix"] or "", f"{_shown(m['a'])}:{_shown(m['b'])}"))
        else:
            out.append(part)
    if not out:
        raise InputError("is empty", flag=flag, value=spec)
    return out


def _no_match(pat: str, keys: list[str], flag: str, spec: str) -> InputError:
    close = difflib.get_close_matches(pat, keys, n=3, cutoff=0.6)
    hint = f"; close: {', '.join(close)}" if close else f"; layers look like {keys[0]}" if keys else ""
    return InputError(f"'{pat}' matches no layer{hint}", flag=flag, value=spec)


def _range_hits(rng: LayerRange, keys: list[str], flag: str, spec: str) -> list[str]:
    """Keys in the range; every number of the range must be a layer (an inclusive range means exactly those)."""
    per_key = {k: rng.numbers(k) for k in keys}
    present = sorted(set().union(*per_key.values())) if per_key else []
    if not present:
        raise _no_match(rng.text, keys, flag, spec)
    missing = next((want for n, want in zip(present, range(rng.a, rng.b + 1)) if n != want), None)
    if missing is None and len(present) < rng.b - rng.a + 1:
        missing = rng.a + len(present)
    if missing is not None:
        every = LayerRange(rng.text, rng.prefix, 0, _HUGE, rng.suffix)
        real = sorted(set().union(*(every.numbers(k) for k in keys)))
        where = (f"the range {rng.bounds} goes past the last layer {every.name(real[-1])} ({len(real)} layers, "
                 f"{real[0]}..{real[-1]})" if missing > real[-1] else
                 f"the range {rng.bounds} has a gap there")
        raise InputError(f"'{rng.name(missing)}' matches no layer: {where}", flag=flag, value=spec)
    return [k for k, ns in per_key.items() if ns]


def select(keys: list[str], spec: str | None, flag: str = "--layers") -> list[str]:
    """The keys (in their order) matched by `spec`; every pattern, and every number of a range, must match at
    least one key."""
    if spec is not None and not spec.strip():
        raise InputError("is empty; give layer names, globs, comma lists or ranges (or leave the flag out for all)",
                         flag=flag, value=repr(spec))
    if spec is None or spec.strip() in ("all", "*"):
        return list(keys)
    chosen = set()
    for pat in expand(spec, flag):
        if isinstance(pat, LayerRange):
            hits = _range_hits(pat, keys, flag, spec)
        else:
            hits = [k for k in keys if fnmatch.fnmatchcase(k, pat)]
            if not hits:
                raise _no_match(pat, keys, flag, spec)
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
