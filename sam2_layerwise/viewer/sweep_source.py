"""A sweep directory as `sam2-layerwise view` reads it: `sweep.json`, the three tables and the kept runs.

Every file is untrusted input. `sweep.json` must be a sweep manifest of a schema version this tool reads, at
most 4 MiB. A table must be a regular file inside the directory, within its size and row bounds, with exactly
the columns and types `sweep.store.columns()` documents, and values in range (item numbers unique, heads and
call indices in range, layer keys of module-name characters, rows that belong to a listed item). A kept run is
listed only when it is a real directory under `runs/` named as the sweep names them and holding a compare
manifest; it is opened through the viewer's own checked readers when asked for. Nothing here is served as a
file: the server sends what these functions return.

The page's numbers are the sweep's own code run on these tables (`sweep.aggregate`): the same per layer x head
reduction, Spearman's rho and attribution summary as `sweep/`, and `top_items` for a clicked head.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sam2_layerwise.errors import InputError
from sam2_layerwise.store.schema import version_problem

log = logging.getLogger("sam2_layerwise")

MAX_MANIFEST = 4 << 20
MAX_TABLE_BYTES = {"items": 256 << 20, "heads": 2 << 30, "attribution": 512 << 20}
MAX_ROWS = {"items": 1_000_000, "heads": 50_000_000, "attribution": 20_000_000}
MAX_RUNS = 100_000  # entries of runs/ looked at
MAX_HEAD, MAX_CALL = 4096, 1_000_000
NAME = re.compile(r"^[A-Za-z0-9_.]{1,200}$")  # layer keys and unit names: module names with dots as underscores
RUN_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,79}-([0-9a-f]{12})$")  # sweep.inputs.Item.name (no leading dot)
KEY = re.compile(r"^[0-9a-f]{64}$")


def is_sweep_dir(path: Path) -> bool:
    from sam2_layerwise.sweep.store import MANIFEST

    return (path / MANIFEST).is_file()


@dataclass
class Tables:
    """One consistent reading of the tables: all items, heads.parquet and attribution.parquet of the ok ones."""

    items: pd.DataFrame
    ok: pd.DataFrame
    heads: pd.DataFrame
    attribution: pd.DataFrame
    stamp: tuple


class SweepSource:
    """An opened sweep directory. `tables()` reads them again when a file changed (a resumed sweep rewrites
    them); a rewrite that does not check keeps the last good reading."""

    def __init__(self, path: Path, manifest: dict, flag: str):
        self.path = path
        self.manifest = manifest
        self.flag = flag
        self._tables: Tables | None = None
        self._runs: tuple[tuple, dict[str, str]] | None = None
        self._page: tuple[Tables, dict] | None = None  # page_data of one reading of the tables
        self._lock = threading.Lock()

    # -- tables --------------------------------------------------------------------------------------------
    def _stamp(self) -> tuple:
        out = []
        for name in ("items", "heads", "attribution"):
            try:
                st = (self.path / f"{name}.parquet").stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def tables(self) -> Tables:
        with self._lock:
            stamp = self._stamp()
            if self._tables is None:
                self._tables = read_tables(self.path, self.flag, stamp)
            elif stamp != self._tables.stamp:
                try:
                    self._tables = read_tables(self.path, self.flag, stamp)
                except InputError as exc:
                    log.warning("view: the sweep's tables changed and do not check (%s); showing the last good ones",
                                exc)
            return self._tables

    # -- kept runs -----------------------------------------------------------------------------------------
    def runs(self) -> dict[str, str]:
        """key[:12] -> the folder name under runs/ of every kept compare run."""
        from sam2_layerwise.store.compare_run import MANIFEST

        root = self.path / "runs"
        try:
            st = root.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
        except OSError:
            return {}
        if root.is_symlink() or not root.is_dir():
            return {}
        with self._lock:
            if self._runs is not None and self._runs[0] == stamp:
                return self._runs[1]
            found: dict[str, str] = {}
            for i, entry in enumerate(root.iterdir()):
                if i >= MAX_RUNS:
                    break
                m = RUN_NAME.match(entry.name)
                if m and not entry.is_symlink() and entry.is_dir() and (entry / MANIFEST).is_file():
                    found[m.group(1)] = entry.name
            self._runs = (stamp, found)
            return found

    def run_dir(self, name: str) -> Path | None:
        """The kept run `name` (as listed by runs()), or None."""
        m = RUN_NAME.match(name or "")
        if not m or self.runs().get(m.group(1)) != name:
            return None
        return self.path / "runs" / name

    def item_runs(self, items: pd.DataFrame) -> dict[int, str]:
        """item -> URL of its kept run (served: the run's viewer)."""
        runs = self.runs()
        return {int(r.item): f"/runs/{runs[r.key[:12]]}/" for r in items[["item", "key"]].itertuples(index=False)
                if isinstance(r.key, str) and r.key[:12] in runs}

    # -- what the page shows -------------------------------------------------------------------------------
    def page_data(self) -> dict:
        from sam2_layerwise.sweep.aggregate import attribution_summary, heads_summary, layers_summary
        from sam2_layerwise.sweep.page import page_data

        t = self.tables()
        cached = self._page
        if cached is not None and cached[0] is t:
            return cached[1]
        hs = heads_summary(t.heads)
        ls = layers_summary(t.heads, t.ok, t.attribution)
        at = attribution_summary(t.attribution)
        summary = {"items": {"ok": len(t.ok), "failed": len(t.items) - len(t.ok),
                             "iou_mean": float(t.ok["iou"].mean()) if len(t.ok) and t.ok["iou"].notna().any()
                             else None}}
        data = page_data(hs, ls, at, summary, served=True)
        data["sweep"] = {"path": str(self.path), "status": str(self.manifest.get("status"))[:40]}
        self._page = (t, data)
        return data

    def top(self, layer: str, call: int, head: int, metric: str, n: int) -> dict:
        """The n items where head `head` of call `call` of layer `layer` changed most by `metric` (the page's
        item list), with those items' details. Raises KeyError for a head the sweep did not measure."""
        from sam2_layerwise.sweep.aggregate import top_items
        from sam2_layerwise.sweep.page import item_meta, top_rows

        t = self.tables()
        h = t.heads
        sel = h[(h["layer_key"] == layer) & (h["call_index"] == call) & (h["head"] == head)]
        if sel.empty:
            raise KeyError(f"{layer} call {call} head {head}")
        rows = top_rows(top_items(sel, t.ok, n=n, metric=metric)).get(f"{layer}#{call}#{head}", [])
        listed = t.ok[t.ok["item"].isin([r[0] for r in rows])]
        return {"ok": True, "layer": layer, "call": call, "head": head, "metric": metric, "rows": rows,
                "items": item_meta(listed, self.item_runs(listed))}

    def layer_keys(self) -> set[str]:
        return set(self.tables().heads["layer_key"])


def open_sweep(run_dir: str | Path, flag: str = "RUN_DIR") -> SweepSource:
    """A sweep directory (or its `sweep/` folder), checked: its manifest and its tables."""
    from sam2_layerwise.sweep.store import AGGREGATE, MANIFEST, SCHEMA, SCHEMA_VERSION

    p = Path(str(run_dir)).expanduser()
    if p.name == AGGREGATE and not is_sweep_dir(p) and is_sweep_dir(p.parent):
        p = p.parent
    bad = lambda why: InputError(why, flag=flag, value=str(run_dir))  # noqa: E731
    marker = p / MANIFEST
    if marker.is_symlink() or not marker.is_file():
        raise bad(f"has no {MANIFEST}: not a sweep directory")
    if marker.stat().st_size > MAX_MANIFEST:
        raise bad(f"{MANIFEST} is larger than {MAX_MANIFEST >> 20} MiB: not one this tool wrote")
    try:
        manifest = json.loads(marker.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise bad(f"{MANIFEST} cannot be read as JSON ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise bad(f"{MANIFEST} is not a sam2-layerwise sweep manifest")
    if problem := version_problem(manifest, MANIFEST, SCHEMA_VERSION):
        raise bad(problem)
    if not (p / "items.parquet").exists():
        raise bad(f"has no items.parquet yet (sweep status: {str(manifest.get('status'))[:40]}); the tables are "
                  f"written when the sweep ends: wait for it, or rerun it over this directory to finish it")
    src = SweepSource(p, manifest, flag)
    src.tables()  # checked now: a bad table is a one-line error before the server starts
    return src


def read_tables(path: Path, flag: str, stamp: tuple) -> Tables:
    from sam2_layerwise.sweep.store import columns

    schema = columns()
    items = _read_table(path, "items", schema["items"], flag)
    heads = _read_table(path, "heads", schema["heads"], flag)
    attribution = _read_table(path, "attribution", schema["attribution"], flag, optional=True)
    if attribution is None:
        from sam2_layerwise.sweep.store import frame

        attribution = frame([], schema["attribution"])

    def bad(name: str, why: str) -> InputError:
        return InputError(f"{name}.parquet {why}; not a table this tool wrote (rerun the sweep over this directory "
                          f"to write it again)", flag=flag, value=str(path))

    if items["item"].duplicated().any() or (items["item"] < 0).any():
        raise bad("items", "has item numbers that are negative or repeated")
    if not items["status"].isin(["ok", "failed"]).all():
        raise bad("items", "has a status other than ok / failed")
    keys = items["key"].dropna()
    if not keys.map(lambda k: isinstance(k, str) and bool(KEY.match(k))).all():
        raise bad("items", "has an item key that is not a SHA-256")
    ok = items[items["status"] == "ok"]
    ok_items = set(ok["item"])
    for name, df, unit_col in (("heads", heads, "layer_key"), ("attribution", attribution, "unit")):
        if len(df) and not df["item"].isin(ok_items).all():
            raise bad(name, "has rows of items that items.parquet does not list as ok")
        if len(df) and not df[unit_col].map(lambda k: isinstance(k, str) and bool(NAME.match(k))).all():
            raise bad(name, f"has a {unit_col} that is not a module name")
    if len(heads) and (not heads["head"].between(0, MAX_HEAD - 1).all()
                       or not heads["call_index"].between(0, MAX_CALL).all()):
        raise bad("heads", "has a head or call index out of range")
    if heads.duplicated(["item", "layer_key", "call_index", "head"]).any():
        raise bad("heads", "has the same item, layer and head twice")
    return Tables(items=items, ok=ok, heads=heads, attribution=attribution, stamp=stamp)


def _read_table(path: Path, name: str, schema: dict[str, str], flag: str, optional: bool = False):
    """`name`.parquet of the sweep directory, checked against its documented columns and bounds."""
    import pyarrow.parquet as pq

    from sam2_layerwise.sweep.store import frame

    file = path / f"{name}.parquet"

    def bad(why: str) -> InputError:
        return InputError(f"{name}.parquet {why}", flag=flag, value=str(path))

    if not file.exists() and not file.is_symlink():
        if optional:
            return None
        raise bad("is missing; rerun the sweep over this directory to write it")
    if file.is_symlink() or not file.is_file():
        raise bad("is not a regular file (a link or a folder): not one this tool wrote")
    limit = MAX_TABLE_BYTES[name]
    if file.stat().st_size > limit:
        raise bad(f"is larger than {limit >> 20} MiB: not one this tool reads")
    try:
        pf = pq.ParquetFile(file)
        rows = pf.metadata.num_rows
        names = pf.schema_arrow.names
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the same answer
        raise bad(f"cannot be read as Parquet ({type(exc).__name__})") from None
    if rows > MAX_ROWS[name]:
        raise bad(f"has {rows} rows, more than {MAX_ROWS[name]}: not one this tool reads")
    if names != list(schema):
        missing = [c for c in schema if c not in names]
        raise bad("does not have the documented columns (docs/sweep.md)"
                  + (f": {', '.join(missing[:4])} missing" if missing else ""))
    try:
        df = pf.read().to_pandas()
        return frame(df, schema)
    except Exception as exc:  # noqa: BLE001
        raise bad(f"has values of the wrong type ({type(exc).__name__})") from None
