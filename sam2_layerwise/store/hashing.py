"""SHA-256 of input files (checkpoints, configs, images), the identities run manifests record.

`BackgroundHashes` computes them in one background thread while the models load and run: hashlib releases the GIL
on large blocks, and model building and loading are single-threaded, so on a machine with a second core the hashes
of multi-hundred-MiB checkpoints cost little wall time. The result is the same as `sha256_file`.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path


def sha256_file(path: Path | str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
