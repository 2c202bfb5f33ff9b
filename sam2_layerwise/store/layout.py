"""The run-directory layout (seed names) and a staging writer that leaves nothing half-written.

Everything is written into a hidden staging folder beside the output directory and moved into place when
the run succeeded, the summary last. A failed run leaves the output directory as it was.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from sam2_layerwise.errors import InputError

SUMMARY = "layerwise_summary.json"
PREDICTIONS = "predictions.pt"
PREDICTION_IMAGES = "prediction_images"
ATTN_TENSORS = "attn_tensors"
ATTN_IMAGES = "attn_images"
ATTN_OVERLAYS = "attn_overlays"
ATTN_TOPK = "attn_topk"

# Entries a run owns in its output directory; a new run replaces all of them (stale ones are removed).
MANAGED = (SUMMARY, PREDICTIONS, PREDICTION_IMAGES, ATTN_TENSORS, ATTN_IMAGES, ATTN_OVERLAYS, ATTN_TOPK)

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, limit: int = 120) -> str:
    """A file-name part that is safe on every file system: [A-Za-z0-9._-], no leading dot, bounded length."""
    name = _SAFE.sub("_", text).strip("._") or "x"
    return name[:limit]


def check_output_dir(path: str | Path, flag: str = "--output-dir") -> Path:
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise InputError("exists and is not a directory", flag=flag, value=str(path))
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write under {parent}", flag=flag, value=str(path))
    return p


class RunWriter:
    """Stage a run directory, then move it into place. Use as a context manager.

    `path(rel)` gives a path inside the staging folder (creating parents) and records `rel` in `written`.
    `owned` names the top-level entries this writer replaces (default: everything a run writes); it may only
    stage those. On success the old owned entries are moved aside, the staged ones moved in (the summary
    last) and only then is the old set deleted, so a crash never leaves a run without a summary. On an
    exception the staging folder is removed and the output directory is as it was.
    """

    def __init__(self, output_dir: Path, owned: tuple[str, ...] = MANAGED):
        self.output_dir = check_output_dir(output_dir)
        self.owned = owned
        parent = self.output_dir.absolute().parent
        self.staging = parent / f".{self.output_dir.name}.partial-{os.getpid()}"
        self.aside = parent / f".{self.output_dir.name}.old-{os.getpid()}"
        self.written: list[str] = []

    def __enter__(self):
        for d in (self.staging, self.aside):
            if d.exists():
                shutil.rmtree(d)
        self.staging.mkdir(parents=True)
        return self

    def path(self, rel: str) -> Path:
        p = (self.staging / rel).resolve()
        if not p.is_relative_to(self.staging.resolve()):
            raise ValueError(f"refusing to write outside the run directory: {rel}")
        if p.relative_to(self.staging.resolve()).parts[0] not in self.owned:
            raise ValueError(f"this writer does not own {rel} (owns {', '.join(self.owned)})")
        p.parent.mkdir(parents=True, exist_ok=True)
        self.written.append(rel)
        return p

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return False
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.aside.mkdir()
        # The old summary leaves first and the new one arrives last: a summary always describes what is there.
        for name in (SUMMARY, *self.owned):
            target = self.output_dir / name
            if target.exists() or target.is_symlink():
                os.replace(target, self.aside / name)
        for entry in sorted(self.staging.iterdir(), key=lambda e: e.name == SUMMARY):
            os.replace(entry, self.output_dir / entry.name)
        self.staging.rmdir()
        shutil.rmtree(self.aside, ignore_errors=True)
        return False
