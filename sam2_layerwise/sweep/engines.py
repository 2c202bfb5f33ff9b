"""Where a sweep's items run: `local` (this process, one worker) or `ray` (one actor per worker, each loading
both models once; items are actor tasks, retried by Ray on a restarted actor when a worker dies).

Both engines call the same `SweepWorker.run`, so their results are the same (tested); the driver writes each
result as it arrives (`on_result`), so a sweep interrupted at any point keeps what finished.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections import deque

from sam2_layerwise.errors import InputError, condense

log = logging.getLogger("sam2_layerwise")

RAY_INSTALL = "pip install 'sam2-layerwise[ray]'"
CONNECT_TIMEOUT_S = 30.0  # an unreachable --ray-address fails within this
MAX_RESTARTS = 3  # a worker that dies is restarted (models loaded again) this many times
MAX_TASK_RETRIES = 3  # and the item it was running is given to it again


def import_ray():
    """`ray`, or one line saying how to install it (it is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise InputError(f"needs Ray, which is not installed: {RAY_INSTALL} (or pip install 'ray>=2.9')",
                         flag="--engine", value="ray") from None
    return ray


class LocalEngine:
    """Items one after the other in this process, on one worker."""

    name = "local"

    def __init__(self, worker, before_item=None):
        self.worker, self.before_item = worker, before_item
        self.workers = 1

    def run(self, items, on_result) -> None:
        for item in items:
            if self.before_item is not None:
                self.before_item(item)
            on_result(self.worker.run(item))

    def close(self) -> None:
        pass


class _Actor:
    """A Ray actor: one SweepWorker (both models loaded once)."""

    def __init__(self, spec, before_item=None):
        from sam2_layerwise.allocator import tune_for_tensors
        from sam2_layerwise.sweep.worker import SweepWorker

        tune_for_tensors()  # a worker process of the sweep's own, like the CLI's

        logging.getLogger("sam2_layerwise").setLevel(logging.WARNING)
        self.worker = SweepWorker(spec)
        self.before_item = before_item

    def ready(self) -> int:
        return os.getpid()

    def run(self, item) -> dict:
        if self.before_item is not None:
            self.before_item(item)  # tests: kill this worker mid-sweep
        return self.worker.run(item)


def probe(address: str) -> None:
    """A TCP connection to host:port (plain or ray://), so an unreachable address fails fast and clearly."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdecimal():
        raise InputError("expects auto, host:port or ray://host:port", flag="--ray-address", value=address)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
            pass
    except OSError as exc:
        raise InputError(f"cannot reach a Ray cluster there ({exc.strerror or exc}); start one with "
                         f"'ray start --head' or omit --ray-address to start a local Ray instance for this run",
                         flag="--ray-address", value=address) from None


@contextlib.contextmanager
def keep_sigterm_handler(ray):
    """While Ray starts: leave this process's own SIGTERM handler in place, when it has one (the CLI's, which
    unwinds a run like Ctrl-C: exit 143, Ray shut down and finished items kept on the way out).

    `ray.init` replaces it with handlers of its own (`sys.exit(15)`, and on a head node it starts, a drain that
    can wait a minute before exiting 1, printing a stack dump), installed through `ray._private.utils`
    (looked up when called, so a no-op stands in for it here); the handler is also put back afterwards."""
    ours = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    utils = getattr(getattr(ray, "_private", None), "utils", None)
    setter = getattr(utils, "set_sigterm_handler", None)
    if not callable(ours) or setter is None:
        yield
        return
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = setter
        signal.signal(signal.SIGTERM, ours)  # also over a handler Ray's native code installed behind Python's back


def connect(ray, address: str | None, num_cpus: int | None, num_gpus: float | None) -> bool:
    """Join the cluster at `address` ("auto": the one running on this machine) or start a local instance.
    Returns whether this call started Ray (and so should shut it down). Fails within CONNECT_TIMEOUT_S."""
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                  configure_logging=True)
    if address is None:
        with keep_sigterm_handler(ray):
            try:
                ray.init(num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
            except BaseException:  # SIGTERM or Ctrl-C while Ray starts: what it started so far stops too
                ray.shutdown()
                raise
        return True
    t0 = time.monotonic()
    if address != "auto":
        probe(address)
    box: dict = {}

    def init():
        try:
            ray.init(address=address, **kwargs)
            box["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported below, in one line
            box["error"] = exc

    th = threading.Thread(target=init, daemon=True, name="ray-connect")
    with keep_sigterm_handler(ray):
        th.start()
        th.join(max(1.0, CONNECT_TIMEOUT_S - (time.monotonic() - t0) - 1.0))
    if th.is_alive():
        raise InputError(f"no Ray cluster answered within {CONNECT_TIMEOUT_S:.0f} s; check the address (the head "
                         f"node's GCS port, 6379 by default) or omit --ray-address to start a local Ray instance",
                         flag="--ray-address", value=address)
    if "error" in box:
        raise InputError(f"cannot join a Ray cluster there: {condense(box['error'], 200)}", flag="--ray-address",
                         value=address) from None
    return True


class RayEngine:
    """One actor per worker; items are actor tasks (one in flight per actor); results come back as they finish."""

    name = "ray"

    def __init__(self, spec, *, address: str | None, num_workers: int | None, cpus_per_worker: float,
                 gpus_per_worker: float, before_item=None):
        ray = self.ray = import_ray()
        local_cpus = None
        if address is None and not ray.is_initialized():
            n = num_workers or max(1, int((os.cpu_count() or 1) // max(cpus_per_worker, 1e-9)))
            local_cpus = max(int(n * cpus_per_worker + 0.999), 1)
        self.started = connect(ray, address, local_cpus, None)
        try:
            res = ray.cluster_resources()
            if num_workers is None:
                by_cpu = int(res.get("CPU", 1) // cpus_per_worker) if cpus_per_worker > 0 else 1 << 30
                by_gpu = int(res.get("GPU", 0) // gpus_per_worker) if gpus_per_worker > 0 else 1 << 30
                num_workers = max(1, min(by_cpu, by_gpu))
            if gpus_per_worker > 0 and res.get("GPU", 0) < gpus_per_worker:
                raise InputError(f"the Ray cluster has {res.get('GPU', 0):g} GPUs", flag="--num-gpus-per-worker",
                                 value=f"{gpus_per_worker:g}")
            actor_cls = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)(_Actor)
            self.actors = [actor_cls.options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker).remote(
                spec, before_item) for _ in range(num_workers)]
            try:
                ray.get([a.ready.remote() for a in self.actors])
            except Exception as exc:  # noqa: BLE001 - the models did not load on a worker: one line
                raise InputError(f"the Ray workers could not load the models: {condense(_cause(exc), 300)}",
                                 flag="--engine", value="ray") from None
        except BaseException:
            self.close()
            raise
        self.workers = len(self.actors)

    def run(self, items, on_result) -> None:
        from sam2_layerwise.sweep.worker import failed_result

        ray = self.ray
        queue = deque(items)
        pending: dict = {}
        idle = list(self.actors)

        def submit():
            while queue and idle:
                actor = idle.pop()
                item = queue.popleft()
                pending[actor.run.remote(item)] = (actor, item)

        submit()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            actor, item = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the worker died more often than Ray retries: that item failed
                result = failed_result(item, f"the Ray worker running it failed: {condense(_cause(exc), 300)}")
                if not _alive(ray, actor):
                    actor = None
            if actor is not None:
                idle.append(actor)
            elif not idle and not pending and queue:
                raise InputError("every Ray worker died", flag="--engine", value="ray")
            on_result(result)
            submit()

    def close(self) -> None:
        """Stop the actors, and Ray when this engine started it; a second call does nothing."""
        ray = self.ray
        for a in getattr(self, "actors", []):
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self.started:
            ray.shutdown()
            self.started = False


def _cause(exc: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (RayTaskError.cause, ActorDiedError's creation error)."""
    seen = exc
    for _ in range(5):
        inner = getattr(seen, "cause", None) or getattr(seen, "__cause__", None)
        if inner is None or inner is seen:
            break
        seen = inner
    return seen


def _alive(ray, actor) -> bool:
    try:
        ray.get(actor.ready.remote(), timeout=60)
        return True
    except Exception:  # noqa: BLE001
        return False
