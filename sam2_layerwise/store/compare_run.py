"""A compare run directory: `original/` and `quantized/` (each a run in `visualize`'s layout) and `manifest.json`.

Documented in docs/compare.md. Reading one back treats every file as untrusted: the manifest's structure and
version are checked, the halves must be whole runs of the same image and prompts, and every tensor path must
stay inside the run directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sam2_layerwise.errors import InputError
from sam2_layerwise.store import layout
from sam2_layerwise.store.schema import version_problem
from sam2_layerwise.store.hashing import sha256_file  # noqa: F401  (compare's callers use it from here)

COMPARE_RUN = layout.COMPARE_RUN
MANIFEST = COMPARE_RUN.marker
SCHEMA = COMPARE_RUN.schema
SCHEMA_VERSION = 1
HALVES = ("original", "quantized")
# what a new capture owns inside each half: the entries a single run writes, not the user's own files there
HALF_ENTRIES = tuple(f"{half}/{name}" for half in HALVES for name in layout.MANAGED)
ANALYSIS = "analysis"
ATTRIBUTION = "attribution.json"  # compare --attribute: per-layer counterfactual IoU changes
MODES = {"light": "--save-raw", "full": "--save-full-attn"}


@dataclass
class CompareRun:
    """A compare run read back and checked: the manifest and both halves' summaries."""

    run_dir: Path
    manifest: dict
    summaries: dict[str, dict]  # "original" / "quantized" -> layerwise_summary.json

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    def path(self, half: str, rel: str, flag: str = "--run_dir") -> Path:
        """A file a half's summary names, checked to resolve inside that half's folder and to exist."""
        return inside(self.run_dir, rel, flag, under=half)


METRICS_SCHEMA = "sam2-layerwise/metrics"  # generate's metrics.json


def is_analysis(path: Path) -> bool:
    """Whether `path` is an analysis folder `generate` wrote (its metrics.json says so)."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        with open(path / "metrics.json", "rb") as f:
            data = json.loads(f.read(64 << 20))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("schema") == METRICS_SCHEMA


def owned_entries(run_dir: Path, *names: str) -> tuple[str, ...]:
    """What a new compare run replaces in `run_dir`: `names`, and every analysis `generate` wrote of the old
    capture (under any --output name: it would describe a capture that is gone). Nothing else is touched."""
    found = []
    try:
        found = sorted(e.name for e in Path(run_dir).iterdir() if e.name not in names and is_analysis(e))
    except OSError:
        pass
    return (*names, *found)


def inside(run_dir: Path, rel, flag: str, under: str = "") -> Path:
    """`run_dir/under/rel`, where `rel` was read from a file of the run (untrusted): refused unless it resolves
    to an existing file inside `run_dir/under` (a half's summary names only that half's files: not the other
    half's predictions, which would compare a half with itself)."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        raise InputError(f"names a file outside the run ({under + ': ' if under else ''}{str(rel)[:200]!r})",
                         flag=flag, value=str(run_dir))
    rel = f"{under}/{rel}" if under else rel
    root = (run_dir / under).resolve() if under else run_dir.resolve()
    p = (run_dir / rel).resolve()
    if not p.is_relative_to(root):
        raise InputError(f"names a file outside the run ({rel})", flag=flag, value=str(run_dir))
    if not layout.on_disk(p):
        raise InputError(f"is truncated: {rel} is missing", flag=flag, value=str(run_dir))
    return p


def _read_json(path: Path, what: str, flag: str, run_dir: Path, limit: int = 512 << 20) -> dict:
    try:
        if path.stat().st_size > limit:
            raise InputError(f"{what} is larger than {limit >> 20} MiB", flag=flag, value=str(run_dir))
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"is not a whole compare run: {what} is missing", flag=flag, value=str(run_dir)) from None
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(f"{what} cannot be read ({type(exc).__name__}); the run is damaged", flag=flag,
                         value=str(run_dir)) from None
    if not isinstance(data, dict):
        raise InputError(f"{what} is not a JSON object", flag=flag, value=str(run_dir))
    return data


def _need(d: dict, key: str, typ, what: str, flag: str, run_dir: Path):
    v = d.get(key)
    if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
        raise InputError(f"{what} lacks a valid '{key}'", flag=flag, value=str(run_dir))
    return v


def _count(value, positive: bool = False) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= (1 if positive else 0)


def _manifest_field_problem(m: dict) -> str | None:
    """The manifest's descriptive fields, checked when present (runs of earlier versions may lack them): what is
    wrong with the first that does not hold what compare writes, else None."""
    halves = m.get("halves")
    if halves is not None and (not isinstance(halves, dict)
                               or any(halves.get(half) != f"{half}/" for half in HALVES)):
        return "a malformed 'halves' entry (compare writes {'original': 'original/', 'quantized': 'quantized/'})"
    if "attention_calls" in m and not _count(m["attention_calls"]):
        return f"a malformed 'attention_calls' {m['attention_calls']!r} (a count)"
    full_dtype = m.get("full_dtype")
    allowed = (None,) if m.get("mode") == "light" else ("float32", "float16")
    if "full_dtype" in m and full_dtype not in allowed:
        return f"a 'full_dtype' {full_dtype!r} that {m.get('mode')} mode does not write"
    for key in ("width", "height"):
        if key in m["image"] and not _count(m["image"][key], positive=True):
            return f"a malformed image {key} {m['image'][key]!r}"
    return None


def open_compare_run(run_dir: str | Path, flag: str = "--run_dir") -> CompareRun:
    """Read and check a compare run: manifest schema and version, both halves present, same image and prompts."""
    from sam2_layerwise.store.summary import SCHEMA as SUMMARY_SCHEMA
    from sam2_layerwise.store.summary import SCHEMA_VERSION as SUMMARY_VERSION

    p = Path(str(run_dir)).expanduser()
    if not str(run_dir).strip():
        raise InputError("is empty", flag=flag, value=repr(str(run_dir)))
    if not p.is_dir():
        raise InputError("is not a directory", flag=flag, value=str(run_dir))
    if not (p / MANIFEST).is_file():
        hint = " (it is a single-model run from 'visualize')" if (p / layout.SUMMARY).is_file() else ""
        raise InputError(f"is not a compare run: no {MANIFEST}{hint}; make one with 'sam2-layerwise compare'",
                         flag=flag, value=str(run_dir))
    m = _read_json(p / MANIFEST, MANIFEST, flag, p, limit=64 << 20)
    if m.get("schema") != SCHEMA:
        raise InputError(f"{MANIFEST} is not a sam2-layerwise compare manifest", flag=flag, value=str(run_dir))
    if problem := version_problem(m, MANIFEST, SCHEMA_VERSION):
        raise InputError(problem, flag=flag, value=str(run_dir))
    mode = m.get("mode")
    if not isinstance(mode, str) or mode not in MODES:
        raise InputError(f"{MANIFEST} has an unknown mode {mode!r}", flag=flag, value=str(run_dir))
    _need(m, "image", dict, MANIFEST, flag, p)
    _need(m, "prompts", dict, MANIFEST, flag, p)
    models = _need(m, "models", dict, MANIFEST, flag, p)
    if any(not isinstance(models.get(half), dict) for half in HALVES):
        raise InputError(f"{MANIFEST} lacks a valid 'models' entry for each half", flag=flag, value=str(run_dir))
    if m.get("quantization_config") is not None:
        _need(m, "quantization_config", dict, MANIFEST, flag, p)
    if problem := _manifest_field_problem(m):
        raise InputError(f"{MANIFEST} has {problem}", flag=flag, value=str(run_dir))
    summaries = {}
    for half in HALVES:
        if (p / half).is_symlink():  # every file of the half would be read from wherever it leads
            raise InputError(f"{half}/ is a link to {os.readlink(p / half)}: names files outside the run", flag=flag,
                             value=str(run_dir))
        s = _read_json(p / half / layout.SUMMARY, f"{half}/{layout.SUMMARY}", flag, p)
        if s.get("schema") != SUMMARY_SCHEMA:
            raise InputError(f"{half}/{layout.SUMMARY} is not a sam2-layerwise summary", flag=flag, value=str(run_dir))
        if problem := version_problem(s, f"{half}/{layout.SUMMARY}", SUMMARY_VERSION):
            raise InputError(problem, flag=flag, value=str(run_dir))
        att = _need(s, "attention", list, f"{half}/{layout.SUMMARY}", flag, p)
        for entry in att:
            if not isinstance(entry, dict) or not isinstance(entry.get("layer_key"), str) \
                    or not isinstance(entry.get("heads"), int) or not isinstance(entry.get("files"), dict) \
                    or not isinstance(entry.get("queries"), list):
                raise InputError(f"{half}/{layout.SUMMARY} has a malformed attention entry", flag=flag,
                                 value=str(run_dir))
        calls = [(e["layer_key"], e.get("call_index", 0)) for e in att]
        # one call's values would stand in for another's (repr: a tampered call_index may be unhashable)
        if len(set(map(repr, calls))) != len(calls):
            raise InputError(f"{half}/{layout.SUMMARY} lists an attention call twice (layer_key and call_index)",
                             flag=flag, value=str(run_dir))
        for key in ("frame", "prompts", "image", "prediction"):
            _need(s, key, dict, f"{half}/{layout.SUMMARY}", flag, p)
        for key in ("capture_options", "frames", "compare"):  # optional sections: objects when present
            if s.get(key) is not None:
                _need(s, key, dict, f"{half}/{layout.SUMMARY}", flag, p)
        if s.get("compare") is not None:  # the quantized half's errors measured by compare
            found = s["compare"]
            if found.get("errors") is not None:
                _need(found, "errors", dict, f"{half}/{layout.SUMMARY} compare", flag, p)
        summaries[half] = s
    a, b = summaries["original"], summaries["quantized"]
    if a["image"].get("sha256") != b["image"].get("sha256") or a["frame"] != b["frame"]:
        raise InputError("its two halves were captured on different images", flag=flag, value=str(run_dir))
    if a["prompts"] != b["prompts"] or a.get("query_locations") != b.get("query_locations"):
        raise InputError("its two halves were captured with different prompts", flag=flag, value=str(run_dir))
    if a["image"].get("sha256") != m["image"].get("sha256") or a["prompts"] != m["prompts"]:
        raise InputError(f"its halves do not match {MANIFEST} (image or prompts)", flag=flag, value=str(run_dir))
    calls = m.get("attention_calls")
    if calls is not None and a.get("mode") != "video" and not len(a["attention"]) == len(b["attention"]) == calls:
        raise InputError(f"its halves hold {len(a['attention'])} and {len(b['attention'])} attention calls where "
                         f"{MANIFEST} says {calls}; the run is damaged", flag=flag, value=str(run_dir))
    return CompareRun(run_dir=p, manifest=m, summaries=summaries)
