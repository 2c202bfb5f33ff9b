"""A run as the viewer reads it: a compare run (two halves) or a single `visualize` run (one), never the model.

Both kinds are read through the project's own checked readers (`store.compare_run.open_compare_run`,
`render.saved.open_run`), so every file is untrusted input: summaries are checked field by field, tensor paths
must stay inside the run, tensor files are loaded with `weights_only=True`.

Sides are named "fp" (the float model, or the only model of a single run) and "q" (the quantized model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sam2_layerwise.errors import InputError
from sam2_layerwise.geometry import ImageFrame
from sam2_layerwise.inputs import Prompts
from sam2_layerwise.store import layout

SIDES = {"original": "fp", "quantized": "q"}
SIDE_TITLES = {"fp": "float (FP)", "q": "quantized (Q)", "model": "model"}


@dataclass
class Half:
    """One side of a run: its directory (the half of a compare run, or the run itself) and its summary."""

    side: str  # "fp" / "q"
    title: str
    run_dir: Path
    saved: object  # render.saved.SavedRun
    entries: dict[tuple[str, int], dict] = field(default_factory=dict)  # (layer_key, call_index) -> summary entry

    @property
    def summary(self) -> dict:
        return self.saved.summary


@dataclass
class ViewerRun:
    """A run directory opened for the viewer."""

    run_dir: Path
    kind: str  # "compare" / "single"
    mode: str | None  # compare runs: "light" / "full"; single runs: None
    halves: list[Half]
    frame: ImageFrame
    prompts: Prompts
    manifest: dict | None = None
    compare: object = None  # store.compare_run.CompareRun of a compare run

    @property
    def order(self) -> list[tuple[str, int]]:
        """(layer_key, call_index) of every attention call, in model order (the first side's)."""
        return list(self.halves[0].entries)

    def half(self, side: str) -> Half | None:
        return next((h for h in self.halves if h.side == side), None)


def _entries(summary: dict) -> dict[tuple[str, int], dict]:
    return {(e["layer_key"], int(e.get("call_index") or 0)): e for e in summary["attention"]}


def is_compare_run(path: Path) -> bool:
    return (path / layout.COMPARE_RUN.marker).is_file()


def open_viewer_run(run_dir: str | Path, flag: str = "RUN_DIR") -> ViewerRun:
    """Open a compare run (manifest.json) or a single visualize run (layerwise_summary.json), checked."""
    from sam2_layerwise.render.saved import open_run
    from sam2_layerwise.store.compare_run import HALVES, open_compare_run

    p = Path(str(run_dir)).expanduser()
    if not str(run_dir).strip():
        raise InputError("is empty; give a run directory", flag=flag, value=repr(str(run_dir)))
    if not p.is_dir():
        raise InputError("is not a directory", flag=flag, value=str(run_dir))
    if is_compare_run(p):
        cr = open_compare_run(p, flag=flag)
        halves = []
        for name in HALVES:
            saved = open_run(p / name, flag=flag)
            side = SIDES[name]
            halves.append(Half(side, SIDE_TITLES[side], p / name, saved, _entries(saved.summary)))
        if list(halves[0].entries) != list(halves[1].entries):
            raise InputError("its halves captured different attention calls", flag=flag, value=str(run_dir))
        fp = halves[0].saved
        return ViewerRun(p, "compare", cr.mode, halves, fp.frame, fp.prompts, manifest=cr.manifest, compare=cr)
    if (p / layout.SUMMARY).is_file():
        saved = open_run(p, flag=flag)
        half = Half("fp", SIDE_TITLES["model"], p, saved, _entries(saved.summary))
        return ViewerRun(p, "single", None, [half], saved.frame, saved.prompts)
    raise InputError(f"is neither a compare run ({layout.COMPARE_RUN.marker}) nor a visualize run "
                     f"({layout.SUMMARY}) nor a sweep ({layout.KINDS['sweep'].marker})", flag=flag, value=str(run_dir))
