"""The sweep directory: `sweep.json`, one result shard per finished item (`parts/<key>/`), the tables
(`items.parquet`, `heads.parquet`, `attribution.parquet`), the aggregation (`sweep/`) and, with --keep-runs,
one compare run per item (`runs/`). Layout and columns: docs/sweep.md.

Resumable: a shard is written whole (staged, then renamed) as soon as its item is done, so a sweep killed at any
point keeps every finished item; a rerun over the same directory skips them. A directory made with other models
or options is refused, naming what differs. Everything read back (sweep.json, shards) is untrusted: a shard that
does not read back as this tool wrote it is computed again.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import pandas as pd

from sam2_layerwise.errors import InputError, condense, utf8_text
from sam2_layerwise.store import layout
from sam2_layerwise.store.schema import version_problem

log = logging.getLogger("sam2_layerwise")

SWEEP_RUN = layout.KINDS["sweep"]
MANIFEST = SWEEP_RUN.marker
SCHEMA = SWEEP_RUN.schema
SCHEMA_VERSION = 1
PARTS, RUNS, AGGREGATE = "parts", "runs", "sweep"
ITEMS, HEADS, ATTRIBUTION = "items.parquet", "heads.parquet", "attribution.parquet"
LOCK = ".sweep.lock"
SHARD = ("item.parquet", HEADS, ATTRIBUTION)  # one item's files in parts/<key>/
DIGESTS = "sha256.json"  # a shard's files and their SHA-256, written with them
_KEY = re.compile(r"^[0-9a-f]{64}$")


# -- table columns (docs/sweep.md) ---------------------------------------------------------------------------
def _head_metrics() -> tuple[str, ...]:
    from sam2_layerwise.analysis.generate import ALL_QUERY_STATS, ERRORS
    from sam2_layerwise.metrics import PAIR_METRICS

    return ("js_mean", "js_p95", "js_max", *[m for m in PAIR_METRICS if m != "js"], *ERRORS,
            *[f"all_queries_{s}_{x}" for s in ALL_QUERY_STATS for x in ("fp", "q", "delta")])


def columns() -> dict[str, dict[str, str]]:
    """table -> {column: dtype}, in order."""
    from sam2_layerwise.analysis.attribute import ROW_COLUMNS
    from sam2_layerwise.sweep.worker import ITEM_METRICS, TIMINGS

    item = {"item": "int64", "key": "str", "image": "str", "image_sha256": "str", "width": "Int64",
            "height": "Int64", "source": "str", "prompt": "str", "points": "str", "box": "str", "mask": "str",
            "status": "str", "error": "str"}
    item.update({m: "float64" for m in ITEM_METRICS})
    item.update(chosen_fp="Int64", chosen_q="Int64", chosen_changed="boolean")
    item.update({t: "float64" for t in TIMINGS})
    heads = {"item": "int64", "key": "str", "order": "int64", "layer": "str", "layer_key": "str",
             "call_index": "int64", "kind": "str", "head": "int64", "scope": "str", "n_queries": "int64",
             "js_undefined": "Int64"}
    heads.update({m: "float64" for m in _head_metrics()})
    attribution = {"item": "int64", "key": "str"}
    attribution.update({c: "float64" for c in ROW_COLUMNS})
    attribution.update(order="int64", unit="str", kind="str", mode="str", sites="int64", params="int64",
                       restart="str", chosen_changed="bool")
    return {"items": item, "heads": heads, "attribution": attribution}


def frame(rows, schema: dict[str, str]) -> pd.DataFrame:
    """Rows (dicts, or a DataFrame) -> a DataFrame with exactly `schema`'s columns and dtypes (missing values:
    NaN / None / <NA>)."""
    df = rows.reindex(columns=list(schema)) if isinstance(rows, pd.DataFrame) else \
        pd.DataFrame(rows, columns=list(schema))
    for col, dtype in schema.items():
        if dtype == "str":  # file names that are not UTF-8 as text Parquet can hold
            df[col] = df[col].astype(object).where(df[col].notna(), None).map(
                lambda v: utf8_text(v) if isinstance(v, str) else v)
        else:
            df[col] = df[col].astype(dtype)
    return df


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False, engine="pyarrow")
    return buf.getvalue()


# -- sweep.json ----------------------------------------------------------------------------------------------
def _flat(d, prefix="") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v) -> str:
    s = json.dumps(v)
    return s[:14] + "..." if isinstance(v, str) and len(v) > 16 else s


def identity_differences(ours: dict, theirs: dict) -> list[str]:
    a, b = _flat(ours), _flat(theirs if isinstance(theirs, dict) else {})
    return [f"{k} ({_short(a.get(k))} now, {_short(b.get(k))} there)" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


class SweepDir:
    """An open sweep directory (locked against a second sweep writing into it)."""

    def __init__(self, path: Path, flag: str = "--output-dir"):
        self.path = path
        self.flag = flag
        self._lock_fd: int | None = None
        self.manifest: dict = {}
        self._parts: dict[str, dict | None] = {}  # shards read back this run (`read_part`)

    @classmethod
    def open(cls, path, identity: dict, flag: str = "--output-dir") -> "SweepDir":
        """Check `path` (new, empty, or a sweep of the same models and options), lock it, write sweep.json."""
        p = layout.check_output_dir(path, flag, SWEEP_RUN)
        d = cls(p, flag)
        existing = None
        if (p / MANIFEST).is_file():
            existing = d._read_manifest()
            theirs = existing.get("identity")
            diff = identity_differences(identity, theirs)
            if diff:
                raise InputError(f"holds a sweep made with other models or options, so it cannot be resumed: "
                                 f"{'; '.join(diff[:4])}{' (+%d more)' % (len(diff) - 4) if len(diff) > 4 else ''}; "
                                 f"give a new --output-dir or the same flags", flag=flag, value=str(path))
        p.mkdir(parents=True, exist_ok=True)
        d.manifest = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
                      "created": (existing or {}).get("created") or _now(), "identity": identity}
        if existing is None:
            d.write_manifest(status="running")  # the directory is a sweep from now on (resumable)
        d._lock()
        d._remove_leftovers()
        return d

    def _remove_leftovers(self) -> None:
        """What a sweep killed mid-write left: staging folders of the aggregation and half-written temporary
        files (this process holds the lock, so nobody else is writing them)."""
        for entry in self.path.iterdir():
            name = entry.name
            if re.match(rf"^\.{AGGREGATE}\.(partial|old)-\d+-[0-9a-f]{{8}}$", name) and entry.is_dir() \
                    and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            elif name.startswith(".") and name.endswith(".tmp") and entry.is_file():
                entry.unlink(missing_ok=True)

    def _read_manifest(self) -> dict:
        try:
            data = json.loads((self.path / MANIFEST).read_bytes())
        except (OSError, ValueError) as exc:
            raise InputError(f"{MANIFEST} cannot be read ({type(exc).__name__}); not a sweep directory this tool "
                             f"can resume", flag=self.flag, value=str(self.path)) from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise InputError(f"{MANIFEST} is not a sam2-layerwise sweep manifest", flag=self.flag,
                             value=str(self.path))
        if problem := version_problem(data, MANIFEST, SCHEMA_VERSION):
            raise InputError(problem, flag=self.flag, value=str(self.path))
        if not isinstance(data.get("identity"), dict):
            raise InputError(f"{MANIFEST} lacks its identity (models and options)", flag=self.flag,
                             value=str(self.path))
        return data

    def _lock(self) -> None:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError("another sweep is writing into this directory right now; wait for it or give another "
                             "--output-dir", flag=self.flag, value=str(self.path)) from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def write_manifest(self, **fields) -> None:
        from sam2_layerwise.store.atomic import atomic_write_json

        self.manifest.update(fields, updated=_now())
        atomic_write_json(self.manifest, self.path / MANIFEST)

    # -- shards --------------------------------------------------------------------------------------------
    def part_dir(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"not an item key: {key!r}")
        return self.path / PARTS / key

    def write_part(self, result: dict) -> None:
        """One item's result, staged and renamed into `parts/<key>/` (a failed item's shard is replaced by
        the next attempt's)."""
        schema = columns()
        key = result["key"]
        row = {"key": key, "status": result["status"], "error": result["error"], "width": result.get("width"),
               "height": result.get("height"), **result.get("metrics", {}), **result.get("timings", {})}
        item_cols = {c: t for c, t in schema["items"].items() if c in _result_item_columns()}
        heads = [{"key": key, "item": -1, **r} for r in result.get("heads", [])]
        attribution = [{"key": key, "item": -1, **r} for r in result.get("attribution", [])]
        final = self.part_dir(key)
        stage = final.parent / f".{key}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        stage.mkdir(parents=True)
        try:
            tables = (frame([row], item_cols), frame(heads, schema["heads"]), frame(attribution, schema["attribution"]))
            files = {name: _parquet_bytes(df) for name, df in zip(SHARD, tables)}
            for name, data in files.items():
                (stage / name).write_bytes(data)
            (stage / DIGESTS).write_text(json.dumps({n: hashlib.sha256(b).hexdigest() for n, b in files.items()}))
            for f in stage.iterdir():
                os.chmod(f, 0o666 & ~_umask())
            if final.exists():
                old = final.parent / f".{key}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
                os.rename(stage, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(stage, final)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        self._parts.pop(key, None)
        if self.path not in layout.COMMITTED:
            layout.COMMITTED.append(self.path)  # an interrupted sweep keeps what it finished: the CLI says so

    def read_part(self, key: str) -> dict | None:
        """{"item": row dict, "heads": DataFrame, "attribution": DataFrame} of a finished shard, or None when
        the shard is missing or does not read back as this tool wrote it (files, columns, their types, values
        no measurement can take: `_impossible`). Read once per run (`finished`, then `assemble`)."""
        if key not in self._parts:
            self._parts[key] = self._read_part(key)
        return self._parts[key]

    def _read_part(self, key: str) -> dict | None:
        d = self.part_dir(key)
        if not d.is_dir() or d.is_symlink():
            return None
        schema = columns()
        try:
            # the bytes this tool wrote, to the byte (a row deleted or a column rewritten by hand reads as valid
            # Parquet); links are not followed
            if any((d / n).is_symlink() for n in (*SHARD, DIGESTS)):
                raise ValueError("a link")
            digests = json.loads((d / DIGESTS).read_bytes()[:4096])
            data = {n: (d / n).read_bytes() for n in SHARD}
            if not isinstance(digests, dict) or any(digests.get(n) != hashlib.sha256(b).hexdigest()
                                                    for n, b in data.items()):
                raise ValueError("not the bytes written")
            item, heads, attribution = (pd.read_parquet(io.BytesIO(data[n]), engine="pyarrow") for n in SHARD)
        except Exception as exc:  # noqa: BLE001 - a damaged shard is computed again
            log.warning("sweep: the result of item %s cannot be read back (%s); computing it again", key[:12],
                        condense(exc, 80))
            return None
        problem = None
        if not (len(item) == 1 and set(item.columns) <= set(schema["items"]) and {"status", "error"} <= set(item.columns)
                and list(heads.columns) == list(schema["heads"])
                and list(attribution.columns) == list(schema["attribution"])):
            problem = "its columns are not this tool's"
        else:
            try:  # the types this tool writes (a value that does not convert is not ours)
                item = frame(item, {c: schema["items"][c] for c in item.columns})
                heads, attribution = frame(heads, schema["heads"]), frame(attribution, schema["attribution"])
            except (TypeError, ValueError, OverflowError) as exc:
                problem = f"a column has the wrong type ({type(exc).__name__})"
            else:
                problem = _impossible(key, item, heads, attribution)
        if problem:
            log.warning("sweep: the result of item %s is not a shard this tool wrote (%s); computing it again",
                        key[:12], problem)
            return None
        return {"item": item.iloc[0].to_dict(), "heads": heads, "attribution": attribution}

    def finished(self) -> set[str]:
        """Keys whose shards read back whole (`read_part`) and say `ok` (failed items are tried again)."""
        out = set()
        parts = self.path / PARTS
        if not parts.is_dir():
            return out
        for d in parts.iterdir():
            if not _KEY.match(d.name) or not d.is_dir():
                if d.name.startswith(".") and (".partial-" in d.name or ".old-" in d.name):
                    shutil.rmtree(d, ignore_errors=True)  # left by a killed sweep
                continue
            part = self.read_part(d.name)
            if part is not None and part["item"]["status"] == "ok":
                out.add(d.name)
        return out

    # -- tables --------------------------------------------------------------------------------------------
    def write_table(self, name: str, df: pd.DataFrame) -> None:
        from sam2_layerwise.store.atomic import atomic_write_bytes

        atomic_write_bytes(_parquet_bytes(df), self.path / name)


# the values each measurement can take: a shard holding others was not written by this tool
_UNIT = ("iou", "iou_mean", "iou_min", "iou_loss", "sign_agreement", "gt_iou_fp", "gt_iou_q", "baseline_iou",
         "baseline_iou_mean", "js_mean", "js_p95", "js_max", "entropy_norm_fp", "entropy_norm_q", "topk_mass_fp",
         "topk_overlap")
# a quantized row's raw mass, which passes 1 where its quantizer rounds up (log2: anything above 2^-0.5 is 1)
_RAW_MASS = ("topk_mass_q", "q_mass_on_fp_topk", "all_queries_topk_mass_q", "all_queries_topk_mass_delta")
_SIGNED_UNIT = ("gt_iou_delta", "delta_iou", "delta_iou_mean", "entropy_norm_delta")
_NON_NEGATIVE = ("area_fp", "area_q", "logit_max_abs_error", "logit_mean_abs_error", "q_rel_err", "k_rel_err",
                 "v_rel_err", "out_rel_err", "n_queries", "sites", "params", "seconds", "chosen_fp", "chosen_q",
                 "head", "call_index", "order", "js_undefined")


def _bounds(column: str) -> tuple[float, float] | None:
    """The range a column's values lie in (None: any): generate's own allowance for rounding, and for entropies
    normalised by ln N of padded rows, which reach up to 2 (`generate._all_query_stats`)."""
    from sam2_layerwise.analysis.generate import PROB_MAX

    slack = PROB_MAX - 1.0
    top = 2.0 if "entropy" in column else 1.0
    if column in _RAW_MASS:
        return (-top if column.endswith("_delta") else 0.0) - slack, float("inf")
    if column in _UNIT or (column.startswith("all_queries_") and not column.endswith("_delta")):
        return -slack, top + slack
    if column in _SIGNED_UNIT or column.startswith("all_queries_"):
        return -top - slack, top + slack
    if column in _NON_NEGATIVE or column.startswith("seconds_"):
        return 0.0, float("inf")
    return None


def _impossible(key: str, item: pd.DataFrame, heads: pd.DataFrame, attribution: pd.DataFrame) -> str | None:
    """Why a shard's values cannot be this tool's measurements, or None. Missing values (NaN) are allowed where a
    measurement may have none; an ok item always has its masks' IoU."""
    row = item.iloc[0]
    if row["key"] != key or (heads["key"] != key).any() or (attribution["key"] != key).any():
        return "it names another item"
    if row["status"] not in ("ok", "failed"):
        return f"status {_short(row['status'])}"
    if row["status"] == "ok" and "iou" in item.columns and _missing(row["iou"]):
        return "an ok item without its IoU"
    for name, df in (("item", item), ("heads", heads), ("attribution", attribution)):
        for col in df.columns:
            lo_hi = _bounds(col)
            if lo_hi is None or not len(df):
                continue
            values = pd.to_numeric(df[col], errors="coerce").astype("float64").dropna()
            if not values.between(*lo_hi).all():
                return f"{name} {col} outside [{lo_hi[0]:g}, {lo_hi[1]:g}]"
    return None


def _result_item_columns() -> tuple[str, ...]:
    """The items table's columns a shard holds (the rest comes from the plan)."""
    from sam2_layerwise.sweep.worker import ITEM_METRICS, TIMINGS

    return ("key", "status", "error", "width", "height", *ITEM_METRICS, *TIMINGS)


def _umask() -> int:
    from sam2_layerwise.store.atomic import UMASK

    return UMASK


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def assemble(sweep: SweepDir, items: list, results: dict[str, dict] | None = None) -> dict[str, pd.DataFrame]:
    """The three tables for `items` (in input order) from their shards: item metadata from the plan, values
    from the shard of the item's key (the same key twice shares one result)."""
    schema = columns()
    rows, heads, attribution = [], [], []
    cache: dict[str, dict | None] = {}
    for it in items:
        if it.key not in cache:
            cache[it.key] = sweep.read_part(it.key)
        part = cache[it.key]
        meta = {"item": it.index, "key": it.key, "image": it.image, "image_sha256": it.image_sha256,
                "width": it.width, "height": it.height, "source": it.source, "prompt": it.prompt,
                "points": it.points_text, "box": it.box_text, "mask": it.mask}
        if part is None:
            rows.append({**meta, "status": "failed", "error": it.error or "not run (the sweep was interrupted)"})
            continue
        got = {k: (None if _missing(v) else v) for k, v in part["item"].items()}
        rows.append({**meta, **{k: v for k, v in got.items() if k not in ("width", "height") or v is not None}})
        for name, out in (("heads", heads), ("attribution", attribution)):
            df = part[name]
            if len(df):
                df = df.copy()
                df["item"] = it.index
                out.append(df)
    return {"items": frame(rows, schema["items"]),
            "heads": frame(pd.concat(heads, ignore_index=True) if heads else [], schema["heads"]),
            "attribution": frame(pd.concat(attribution, ignore_index=True) if attribution else [],
                                 schema["attribution"])}


def _missing(v) -> bool:
    try:
        return v is None or bool(pd.isna(v))
    except (TypeError, ValueError):
        return False
