"""The run-directory layout (seed names) and a writer that replaces a run all at once or not at all.

A run is built complete in a hidden staging folder beside the output directory (entries this writer does not
own are hard-linked in from the previous run), then exchanged with the output directory in one atomic
`renameat2(RENAME_EXCHANGE)`; the old run is deleted afterwards. Where the exchange is not available, two
renames with a roll-back on failure do the same, and a crash between them is repaired by the next run. A
failed or interrupted run leaves the output directory byte for byte as it was, and a staging folder left by a
killed process is removed by the next run over the same directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import signal
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sam2_layerwise.errors import InputError

SUMMARY = "layerwise_summary.json"
PREDICTIONS = "predictions.pt"
PREDICTION_IMAGES = "prediction_images"
ATTN_TENSORS = "attn_tensors"
ATTN_IMAGES = "attn_images"
ATTN_OVERLAYS = "attn_overlays"
ATTN_TOPK = "attn_topk"
VIEWER = "viewer"  # visualize --viewer: the browser viewer (index.html + viewer_data/)
MEMORY_CHARTS = "memory_charts"  # visualize --video: memory mass by frame age, per frame

# Entries a run owns in its output directory; a new run replaces all of them (stale ones are removed).
MANAGED = (SUMMARY, PREDICTIONS, PREDICTION_IMAGES, ATTN_TENSORS, ATTN_IMAGES, ATTN_OVERLAYS, ATTN_TOPK, VIEWER,
           MEMORY_CHARTS)

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<what>partial|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_TAG_LEN = len(".partial-4194304-12345678")  # the longest suffix staging names add (pid_max is 2^22)


def safe_name(text: str, limit: int = 120) -> str:
    """A file-name part that is safe on every file system: [A-Za-z0-9._-], no leading dot, bounded length."""
    name = _SAFE.sub("_", text).strip("._") or "x"
    return name[:limit]


@dataclass(frozen=True)
class RunKind:
    """What identifies a run directory of one kind: a JSON file at its top with this schema name."""

    marker: str
    schema: str
    made_by: str  # the command that makes it, for messages


IMAGE_RUN = RunKind(SUMMARY, "sam2-layerwise/summary", "sam2-layerwise visualize")
COMPARE_RUN = RunKind("manifest.json", "sam2-layerwise/compare", "sam2-layerwise compare")  # store.compare_run
SWEEP_RUN = RunKind("sweep.json", "sam2-layerwise/sweep", "sam2-layerwise sweep")  # sweep.store
KINDS: dict[str, RunKind] = {"image": IMAGE_RUN, "compare": COMPARE_RUN, "sweep": SWEEP_RUN}

COMMITTED: list[Path] = []  # run directories replaced by this process, in order (the CLI's last words use it)

_MARKER_LIMIT = 512 << 20  # a summary larger than this is not one we wrote


def run_kind_of(path: Path) -> RunKind | None:
    """The kind of run `path` holds (its marker file parses and names the kind's schema), else None."""
    for kind in KINDS.values():
        marker = path / kind.marker
        try:
            if not marker.is_file() or marker.is_symlink() or marker.stat().st_size > _MARKER_LIMIT:
                continue
            data = json.loads(marker.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("schema") == kind.schema:
            return kind
    return None


def on_disk(path: Path | str, what: str = "file") -> bool:
    """Whether `path` is a file (what="file") or anything at all ("any"); False, not an error, for a name this
    system refuses (over 255 bytes, or holding NUL), as Python 3.12's pathlib answers. For paths read back from
    a run's own files, which a user may have edited."""
    try:
        return Path(path).is_file() if what == "file" else Path(path).exists()
    except (OSError, ValueError):
        return False


# -- checking an output location before any work ---------------------------------------------------------
def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _existing_ancestor(p: Path) -> Path:
    parent = p.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    return parent


def check_location(path: str | Path, flag: str, *, directory: bool) -> Path:
    """Check that `path` (an output directory, or an output file when not `directory`) can be written, before
    any work: not empty, not a dangling link, its parent a writable directory on a file system that takes
    files (probed by creating and removing one), its name short enough for the staging names derived from it.
    Returns the absolute path (links in the parent resolved; a link to a directory is followed)."""
    text = str(path)
    if not text.strip():
        raise InputError("is empty; give a path (e.g. sam2_logs/run1)", flag=flag, value=repr(text))
    p = Path(text).expanduser()
    if p.is_symlink() and not p.exists():
        raise InputError(f"is a link to {os.readlink(p)}, which does not exist", flag=flag, value=text)
    if p.exists():
        p = p.resolve()
        if directory and not p.is_dir():
            raise InputError("exists and is not a directory", flag=flag, value=text)
        if not directory and p.is_dir():
            raise InputError("is a directory; give a file name", flag=flag, value=text)
    else:
        p = p.absolute()
    if p.name in ("", ".", "..") or p == p.parent:
        raise InputError("names no directory entry of its own", flag=flag, value=text)
    ancestor = _existing_ancestor(p)
    if not ancestor.is_dir():
        raise InputError(f"{ancestor} is not a directory", flag=flag, value=text)
    if len(os.fsencode(p.name)) + _TAG_LEN + 1 > _name_max(ancestor):
        raise InputError(f"the name is too long ({len(os.fsencode(p.name))} bytes; at most "
                         f"{_name_max(ancestor) - _TAG_LEN - 1} here)", flag=flag, value=text)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot write under {ancestor} (permission denied)", flag=flag, value=text)
    probe = ancestor / f".sam2-layerwise-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        (probe / "f").write_bytes(b"x")
    except OSError as exc:
        raise InputError(f"cannot write under {ancestor} ({exc.strerror or exc})", flag=flag, value=text) from None
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return p


def check_output_dir(path: str | Path, flag: str = "--output-dir", kind: RunKind = IMAGE_RUN) -> Path:
    """`check_location` for a run directory, which must be new, empty, or a run of `kind` this tool wrote:
    files in any other directory are never replaced or deleted."""
    p = check_location(path, flag, directory=True)
    recover_stale(p)
    if p.is_dir():
        if any(p.iterdir()):
            found = run_kind_of(p)
            if found is None:
                raise InputError(f"is a directory that holds no run of this tool (no {kind.marker} written by "
                                 f"{kind.made_by}); give a new or empty directory so nothing of yours is "
                                 f"overwritten", flag=flag, value=str(path))
            if found != kind:
                raise InputError(f"holds a run of another kind (made by {found.made_by}); give another directory",
                                 flag=flag, value=str(path))
    return p


def check_output_file(path: str | Path, flag: str = "--output", inputs: dict[str, object] | None = None) -> Path:
    """`check_location` for a single output file (a checkpoint). An existing file is replaced only when it is a
    checkpoint (a torch archive), never one of `inputs` ({flag: path or list of paths}), so a mistyped name
    cannot overwrite a photograph, a config or the model the command reads."""
    p = check_location(path, flag, directory=False)
    if not p.exists():
        return p
    for other, values in (inputs or {}).items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            same = False
            with contextlib.suppress(OSError, TypeError, ValueError):
                same = value is not None and os.path.samefile(p, Path(value).expanduser())
            if same:
                raise InputError(f"is also {other}; write the result to a new file", flag=flag, value=str(path))
    if not _torch_archive(p):
        raise InputError("exists and is not a checkpoint; give a new file name (an existing checkpoint may be "
                         "replaced, nothing else)", flag=flag, value=str(path))
    return p


def _torch_archive(p: Path) -> bool:
    """Whether `p` is a file `torch.save` wrote (a zip archive holding `<name>/data.pkl`)."""
    try:
        with zipfile.ZipFile(p) as z:
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


# -- staging folders left behind ---------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(output_dir: Path) -> list[Path]:
    """Remove staging folders of `output_dir` left by killed processes; put back an old run that a crash
    between the two fallback renames left aside. Returns what was removed."""
    parent = output_dir.parent
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _STAGING.match(entry.name)
        if not m or m["name"] != output_dir.name or _alive(int(m["pid"])) or not entry.is_dir():
            continue
        if m["what"] == "old" and not output_dir.exists():
            os.rename(entry, output_dir)  # the new run never arrived: the old one goes back
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


# -- the swap ----------------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    try:
        f = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE). False where not supported."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _carry(src: Path, dst: Path) -> None:
    """Recreate `src` at `dst` with hard links (copies where links are refused), symlinks as symlinks."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        shutil.copystat(src, dst)
        for child in src.iterdir():
            _carry(child, dst / child.name)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _block_signals():
    if hasattr(signal, "pthread_sigmask"):
        try:
            return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        except (OSError, ValueError):
            return None
    return None


def _unblock_signals(old) -> None:
    if old is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class RunWriter:
    """Stage a run directory, then put it in place all at once. Use as a context manager.

    `path(rel)` gives a path inside the staging folder (creating parents) and records `rel` in `written`.
    `owned` names the top-level entries this writer replaces (default: everything a run writes); it may only
    stage those. Everything else of the previous run (tensors a re-render keeps, the user's own notes) is
    carried into the new one with hard links. The output directory must be new, empty, or a run of `kind`
    (checked by `check_output_dir`). On an exception (or SIGINT/SIGTERM, which the CLI turns into one) the
    staging folder is removed and the output directory is as it was.
    """

    def __init__(self, output_dir: Path, owned: tuple[str, ...] = MANAGED, kind: RunKind = IMAGE_RUN,
                 flag: str = "--output-dir"):
        self.output_dir = check_output_dir(output_dir, flag, kind)
        self.owned = owned
        self._owned_parts = [Path(o).parts for o in owned]  # an entry may be a path inside a folder
        self.kind = kind
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        parent = self.output_dir.parent
        self.staging = parent / f".{self.output_dir.name}.partial-{tag}"
        self.aside = parent / f".{self.output_dir.name}.old-{tag}"
        self.written: list[str] = []
        self.committed = False

    def __enter__(self):
        self.staging.parent.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir()
        return self

    def path(self, rel: str) -> Path:
        # lexical: everything under an owned entry of the staging folder was made by this writer (carried
        # entries, the only ones that may hold symlinks, are never owned), so no link can lead elsewhere
        norm = os.path.normpath(rel)
        parts = Path(norm).parts
        if os.path.isabs(norm) or not parts or parts[0] in (".", ".."):
            raise ValueError(f"refusing to write outside the run directory: {rel}")
        if not self._owns(parts):
            raise ValueError(f"this writer does not own {rel} (owns {', '.join(self.owned)})")
        p = self.staging / norm
        p.parent.mkdir(parents=True, exist_ok=True)
        self.written.append(rel)
        return p

    def sub(self, prefix: str) -> "SubWriter":
        """A writer for the sub-run `prefix/` (compare runs hold one per model)."""
        return SubWriter(self, prefix)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return False
        try:
            self._carry_old()
            self._commit()
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise
        shutil.rmtree(self.aside, ignore_errors=True)
        return False

    def _owns(self, parts: tuple[str, ...]) -> bool:
        return any(parts[:len(o)] == o for o in self._owned_parts)

    def _carry_old(self, rel: tuple[str, ...] = ()) -> None:
        """Everything of the old run this writer does not own, into staging. An owned entry may be a path inside a
        folder ("original/layerwise_summary.json"): that folder is then walked, and the user's own files in it are
        carried too."""
        old = self.output_dir.joinpath(*rel)
        if not old.is_dir() or (rel and old.is_symlink()):
            return
        if not rel:
            shutil.copystat(self.output_dir, self.staging)
        for entry in old.iterdir():
            parts = (*rel, entry.name)
            if self._owns(parts):
                continue
            if any(len(o) > len(parts) and o[:len(parts)] == parts for o in self._owned_parts):
                if self.staging.joinpath(*parts).is_dir():  # written by this run: carry what is not its own
                    self._carry_old(parts)
                continue
            if not self.staging.joinpath(*parts).exists():
                _carry(entry, self.staging.joinpath(*parts))

    def _commit(self) -> None:
        """Exchange staging and output directory; the old run ends up at `aside`. Signals wait until done."""
        old_mask = _block_signals()
        try:
            if not self.output_dir.exists():
                os.rename(self.staging, self.output_dir)
            elif exchange(self.staging, self.output_dir):
                self.aside = self.staging  # the staging name now holds the old run
            else:
                os.rename(self.output_dir, self.aside)
                try:
                    os.rename(self.staging, self.output_dir)
                except BaseException:
                    os.rename(self.aside, self.output_dir)
                    raise
            self.committed = True
            COMMITTED.append(self.output_dir)
        finally:
            _unblock_signals(old_mask)


class SubWriter:
    """`path(rel)` of a RunWriter under `prefix/`."""

    def __init__(self, parent: RunWriter, prefix: str):
        self.parent, self.prefix = parent, prefix.strip("/")

    @property
    def written(self) -> list[str]:
        return [w[len(self.prefix) + 1:] for w in self.parent.written if w.startswith(self.prefix + "/")]

    def path(self, rel: str) -> Path:
        return self.parent.path(f"{self.prefix}/{rel}")
