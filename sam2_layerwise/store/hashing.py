"""SHA-256 of input files (checkpoints, configs, images), the identities run manifests record.

`BackgroundHashes` computes them in one background thread while the models load and run: hashlib releases the GIL
on large blocks, and model building and loading are single-threaded, so on a machine with a second core the hashes
of multi-hundred-MiB checkpoints cost little wall time. The result is the same as `sha256_file`.

A file of 16 MiB or more (a checkpoint) has its hash remembered under `hash_cache()`, keyed by what `stat` says of
it: device, inode, size, modification and status-change times in nanoseconds, as git's index does. Writing to the
file changes its status-change time, which no program can set back, so a remembered hash is used only for the very
bytes it was taken of; comparing the same checkpoints on many images hashes each once. Entries are read as
untrusted input (anything malformed or stale is ignored and taken again), and a cache that cannot be written costs
only the time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

REMEMBER_BYTES = 16 << 20  # files this large have their hash remembered
_HEX = re.compile(r"[0-9a-f]{64}")


def hash_cache() -> Path:
    from sam2_layerwise.model.loading import cache_dir

    return cache_dir() / "sha256"


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _entry(path: Path) -> Path:
    return hash_cache() / (hashlib.sha256(os.fsencode(path.resolve())).hexdigest()[:32] + ".json")


def _remembered(path: Path, st: os.stat_result) -> str | None:
    try:
        with open(_entry(path), "rb") as f:
            found = json.loads(f.read(4096))
    except (OSError, ValueError):
        return None
    if isinstance(found, dict) and found.get("stat") == _identity(st):
        digest = found.get("sha256")
        if isinstance(digest, str) and _HEX.fullmatch(digest):
            return digest
    return None


def _remember(path: Path, st: os.stat_result, digest: str) -> None:
    from sam2_layerwise.store.atomic import atomic_write_bytes

    try:
        atomic_write_bytes(json.dumps({"stat": _identity(st), "sha256": digest}).encode(), _entry(path))
    except OSError:
        pass


def remember(path: Path | str, digest: str) -> None:
    """Remember `digest` as the SHA-256 of the file just written at `path` (by the writer that hashed its bytes
    on the way out), as `sha256_file` would after reading it."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return
    if st.st_size >= REMEMBER_BYTES and _HEX.fullmatch(digest):
        _remember(path, st, digest)


def sha256_file(path: Path | str, chunk: int = 1 << 22) -> str:
    path = Path(path)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        large = st.st_size >= REMEMBER_BYTES
        if large and (digest := _remembered(path, st)) is not None:
            return digest
        h = hashlib.sha256()
        while block := f.read(chunk):
            h.update(block)
        digest = h.hexdigest()
        if large and _identity(os.fstat(f.fileno())) == _identity(st):  # not written to while it was read
            _remember(path, st, digest)
    return digest


class BackgroundHashes:
    """`start(path)` queues a file's hash; `get(path)` waits for it (hashing it now if never started). Errors
    (a file gone or unreadable) surface from `get`, as from `sha256_file`. Use as a context manager: leaving it
    drops what was not asked for."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        self._jobs: dict[str, Future] = {}

    @staticmethod
    def _key(path) -> str:
        return str(Path(path).expanduser().resolve())

    def start(self, *paths) -> None:
        for path in paths:
            if path is None:
                continue
            key = self._key(path)
            if key not in self._jobs and Path(key).is_file():
                self._jobs[key] = self._pool.submit(sha256_file, key)

    def get(self, path) -> str:
        key = self._key(path)
        job = self._jobs.get(key)
        return job.result() if job is not None else sha256_file(key)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "BackgroundHashes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
