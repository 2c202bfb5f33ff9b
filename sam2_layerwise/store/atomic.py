"""Atomic writes: every file appears whole or not at all, with the permissions the user's umask gives."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once: os.umask can only be read by setting it
FILE_MODE = 0o666 & ~UMASK


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600 files; a run's files follow the umask like any other
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # say which file could not be written
        raise
    return path


class _Watched:
    """The file torch.save writes through (its writer only writes and flushes): keeps the first OSError a write
    raised (torch turns it into "RuntimeError: unexpected pos", which would hide a full disk) and, with `sha`,
    the SHA-256 of what was written."""

    def __init__(self, f, sha: bool):
        self.f, self.sha, self.error = f, hashlib.sha256() if sha else None, None

    def write(self, data) -> int:
        if self.sha is not None:
            self.sha.update(data)
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj, path: Path, remember_hash: bool = False) -> Path:
    """torch.save, atomically; a write that fails (a full disk) raises its OSError. `remember_hash` (checkpoints):
    the file's SHA-256 is taken from the bytes as they are written and remembered (`hashing.remember`), so the run
    that reads the checkpoint next does not hash it again."""
    hashed = []

    def write(f):
        out = _Watched(f, remember_hash)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
        if out.sha is not None:
            hashed.append(out.sha.hexdigest())

    done = _atomic(Path(path), write)
    if hashed:
        from sam2_layerwise.store.hashing import remember

        remember(done, hashed[0])
    return done


def atomic_write_bytes(data: bytes, path: Path) -> Path:
    return _atomic(Path(path), lambda f: f.write(data))


def json_text(obj, depth: int = 2) -> str:
    """JSON with its outer `depth` levels of objects and lists laid out one entry per line and everything deeper on
    one line: readable where a person looks (sections, then layers), and encoded by json's C encoder below that.
    (`indent=` switches json to its pure-Python encoder: 8x slower on a b+ summary's per-head statistics.)"""

    def lay(value, level: int) -> str:
        pad = " " * (level + 1)
        if level < depth and isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            items = (f"{pad}{json.dumps(k)}: {lay(v, level + 1)}" for k, v in value.items())
            return "{\n" + ",\n".join(items) + "\n" + " " * level + "}"
        if level < depth and isinstance(value, (list, tuple)) and value:
            return "[\n" + ",\n".join(pad + lay(v, level + 1) for v in value) + "\n" + " " * level + "]"
        return json.dumps(value, allow_nan=True)

    return lay(obj, 0)


def atomic_write_json(obj, path: Path) -> Path:
    return atomic_write_bytes((json_text(obj) + "\n").encode(), Path(path))


def atomic_save_png(image, path: Path, compress_level: int | None = None) -> Path:
    """Save a PIL image as PNG atomically (`compress_level`: zlib level 0-9; None: Pillow's default)."""
    kw = {} if compress_level is None else {"compress_level": compress_level}
    return _atomic(Path(path), lambda f: image.save(f, format="PNG", **kw))


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` as `dst` (its folder made if needed); a copy where hard links are not possible."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def safe_load(path: Path):
    """Every saved tensor file is read back with weights_only=True."""
    return torch.load(path, map_location="cpu", weights_only=True)
