"""A whole sweep: check everything, plan the items, skip finished ones, run the rest on an engine, write each
result as it arrives, then the tables and the aggregation.

Order matters for "bad input writes nothing": flags, the quantization config, the inputs (a malformed manifest
names its line), the output directory (a sweep of other models or options is refused) and the models (loaded
once here, by the local engine's worker or as a check for Ray) are all checked before the directory is
created or touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from sam2_layerwise.errors import InputError, ModelError

log = logging.getLogger("sam2_layerwise")


def _check_flags(args) -> None:
    if args.attribute_mode is not None and not args.attribute:
        raise InputError("only applies with --attribute", flag="--attribute-mode", value=args.attribute_mode)
    if args.attribute_layers is not None and not args.attribute:
        raise InputError("only applies with --attribute", flag="--attribute-layers", value=args.attribute_layers)
    if args.engine != "ray":
        for flag, value, default in (("--ray-address", args.ray_address, None),
                                     ("--num-workers", args.num_workers, None),
                                     ("--num-cpus-per-worker", args.num_cpus_per_worker, 1.0),
                                     ("--num-gpus-per-worker", args.num_gpus_per_worker, 0.0)):
            if value != default:
                raise InputError("only applies with --engine ray", flag=flag, value=value)


def _models(args):
    """The quantization config, the float config (its base_config when omitted) and the four files' SHA-256."""
    from sam2_layerwise.cli.compare import quant_config_and_base
    from sam2_layerwise.model.loading import resolve_checkpoint, resolve_config
    from sam2_layerwise.store.hashing import sha256_file

    qcfg = quant_config_and_base(args)
    try:
        config_path = resolve_config(args.config_original)
    except ModelError as exc:
        raise ModelError(exc.detail, flag="--config-original", value=args.config_original) from None
    paths = {}
    for flag, value in (("--checkpoint-original", args.checkpoint_original),
                        ("--checkpoint-quantized", args.checkpoint_quantized)):
        try:
            paths[flag] = resolve_checkpoint(value)
        except ModelError as exc:
            raise ModelError(exc.detail, flag=flag, value=value) from None
    hashes = {
        "original": {"config_sha256": sha256_file(config_path),
                     "checkpoint_sha256": sha256_file(paths["--checkpoint-original"])},
        "quantized": {"config_sha256": sha256_file(Path(args.config_quantized).expanduser()),
                      "checkpoint_sha256": sha256_file(paths["--checkpoint-quantized"])},
    }
    return qcfg, hashes


def identity_of(args, hashes: dict) -> dict:
    """What a resumed sweep must share with the directory's: the models (by content) and every option that
    changes a result."""
    return {
        "models": {"original": {"config_sha256": hashes["original"]["config_sha256"],
                                "checkpoint_sha256": hashes["original"]["checkpoint_sha256"]},
                   "quantized": {"quantization_config_sha256": hashes["quantized"]["config_sha256"],
                                 "checkpoint_sha256": hashes["quantized"]["checkpoint_sha256"]}},
        "options": {"layers": args.layers, "max_attn_queries": args.max_attn_queries, "stats_topk": args.stats_topk,
                    "topk": args.topk, "query_stats": args.query_stats, "single_mask": bool(args.single_mask),
                    "image_size": args.image_size, "precision": args.precision, "attribute": bool(args.attribute),
                    "attribute_mode": (args.attribute_mode or "restore") if args.attribute else None,
                    "attribute_layers": args.attribute_layers if args.attribute else None},
    }


def _fingerprint(identity: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(identity["models"], sort_keys=True).encode()).hexdigest()


def _spec(args, hashes: dict, runs_dir: Path | None, threads: int | None):
    from sam2_layerwise.sweep.worker import WorkerSpec

    return WorkerSpec(
        config_original=args.config_original, checkpoint_original=args.checkpoint_original,
        config_quantized=args.config_quantized, checkpoint_quantized=args.checkpoint_quantized, device=args.device,
        precision=args.precision, image_size=args.image_size, layers=args.layers,
        max_attn_queries=args.max_attn_queries, stats_topk=args.stats_topk, topk=args.topk,
        query_stats=args.query_stats, single_mask=bool(args.single_mask), max_pixels=args.max_pixels,
        attribute=bool(args.attribute), attribute_mode=args.attribute_mode or "restore",
        attribute_layers=args.attribute_layers, runs_dir=str(runs_dir) if runs_dir else None,
        model_hashes=tuple(hashes.items()), threads=threads, argv=tuple(getattr(args, "argv", [])))


def run_sweep(args, *, before_item=None) -> dict:
    """Run `sam2-layerwise sweep` (parsed flags). `before_item(item)` runs in the worker before each item
    (tests use it to kill a Ray worker mid-sweep). Returns counts: total, ok, failed, skipped, ran."""
    from tqdm import tqdm

    from sam2_layerwise.store.layout import check_output_dir
    from sam2_layerwise.sweep import engines
    from sam2_layerwise.sweep.inputs import AutoPrompts, plan_items, read_inputs
    from sam2_layerwise.sweep.store import RUNS, SWEEP_RUN, SweepDir, identity_differences

    t_start = time.perf_counter()
    _check_flags(args)
    if args.engine == "ray":
        engines.import_ray()
        if args.ray_address not in (None, "auto"):
            engines.probe(args.ray_address)  # an unreachable cluster fails here, in seconds, before any work
    auto = AutoPrompts.parse(args.auto_prompts, args.seed)
    kind, rows = read_inputs(args.inputs)
    qcfg, hashes = _models(args)
    identity = identity_of(args, hashes)
    out = check_output_dir(args.output_dir, "--output-dir", SWEEP_RUN)
    if (out / "sweep.json").is_file():  # refuse a mismatch before loading anything
        theirs = SweepDir(out)._read_manifest().get("identity")
        if identity_differences(identity, theirs):
            SweepDir.open(out, identity)  # raises, naming the differences
    if args.attribute and args.attribute_layers is not None:
        _check_attribute_layers(args)

    runs_dir = out / RUNS if args.keep_runs else None
    worker = None
    if args.engine == "local":
        from sam2_layerwise.sweep.worker import SweepWorker

        log.info("sweep: loading both models once")
        worker = SweepWorker(_spec(args, hashes, runs_dir, None))
        if args.attribute:
            from sam2_layerwise.analysis.attribute import select_units

            select_units(worker.units, args.attribute_layers)
    else:  # the workers load them; check here that they load at all (on the CPU)
        from sam2_layerwise.sweep.worker import SweepWorker

        check = _spec(args, hashes, None, None)
        import dataclasses

        probe = SweepWorker(dataclasses.replace(check, device="cpu", precision="fp32"))
        if args.attribute:
            from sam2_layerwise.analysis.attribute import select_units

            select_units(probe.units, args.attribute_layers)
        del probe

    items = plan_items(rows, auto, _fingerprint(identity))
    if args.engine == "local":
        engine = engines.LocalEngine(worker, before_item)
    else:  # joined (or started) and its workers' models loaded before the directory is touched
        engine = engines.RayEngine(_spec(args, hashes, runs_dir, max(1, int(args.num_cpus_per_worker))),
                                   address=args.ray_address, num_workers=args.num_workers,
                                   cpus_per_worker=args.num_cpus_per_worker, gpus_per_worker=args.num_gpus_per_worker,
                                   before_item=before_item)
    try:
        sweep = SweepDir.open(out, identity)
    except BaseException:
        engine.close()
        raise
    try:
        finished = sweep.finished()
        todo, seen = [], set()
        for it in items:
            if it.key not in finished and it.key not in seen:
                todo.append(it)
                seen.add(it.key)
        skipped = len({it.key for it in items if it.key in finished})
        log.info("sweep: %d items from %s (%s prompts); %d already finished, %d to run on the %s engine", len(items),
                 args.inputs, "manifest" if kind == "manifest" else auto.describe(), skipped, len(todo), args.engine)
        sweep.write_manifest(status="running", command=["sam2-layerwise", *getattr(args, "argv", [])],
                             versions=_versions(), inputs={"spec": str(args.inputs), "kind": kind,
                                                           "auto_prompts": auto.describe(), "items": len(items)},
                             engine=args.engine)
        counts = {"ran": 0, "failed_now": 0}
        try:
            with tqdm(total=len(todo), desc=f"sweep ({engine.name}, {engine.workers} worker"
                                            f"{'s' if engine.workers > 1 else ''})", unit="item",
                      disable=True if args.quiet else None) as bar:
                def on_result(result):
                    sweep.write_part(result)
                    counts["ran"] += 1
                    if result["status"] != "ok":
                        counts["failed_now"] += 1
                        log.warning("sweep: item failed: %s", result["error"])
                    bar.update(1)
                engine.run(todo, on_result)
        finally:
            engine.close()
        report = finish(sweep, items, args, t_start)
        report.update(skipped=skipped, ran=counts["ran"])
        return report
    finally:
        engine.close()  # idempotent
        sweep.close()


def _check_attribute_layers(args) -> None:
    """A pattern that can never match a unit name is refused before the models load (the full check, against
    the model's units, follows once they are loaded)."""
    from sam2_layerwise.layers import expand

    expand(args.attribute_layers, "--attribute-layers")


def _versions() -> dict:
    from sam2_layerwise.analysis.pair import _versions

    return _versions()


def finish(sweep, items, args, t_start: float) -> dict:
    """The tables for this run's items, the aggregation (`sweep/`, replaced whole) and sweep.json's counts."""
    from sam2_layerwise.store.atomic import atomic_write_bytes
    from sam2_layerwise.store.layout import exchange
    from sam2_layerwise.sweep.aggregate import aggregate
    from sam2_layerwise.sweep.store import AGGREGATE, ATTRIBUTION, HEADS, ITEMS, RUNS, assemble

    tables = assemble(sweep, items)
    sweep.write_table(ITEMS, tables["items"])
    sweep.write_table(HEADS, tables["heads"])
    if args.attribute:
        sweep.write_table(ATTRIBUTION, tables["attribution"])
    runs = {}
    if (sweep.path / RUNS).is_dir():
        for it in items:
            if (sweep.path / RUNS / it.name / "manifest.json").is_file():
                runs[it.index] = f"{RUNS}/{it.name}"
    final = sweep.path / AGGREGATE
    stage = sweep.path / f".{AGGREGATE}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        summary = aggregate(tables, lambda rel, data: atomic_write_bytes(data, stage / rel), rank=args.rank,
                            runs=runs)
        if final.exists():
            if not exchange(stage, final):
                old = sweep.path / f".{AGGREGATE}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
                os.rename(stage, final)
                stage = old
        else:
            os.rename(stage, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    ok = int((tables["items"]["status"] == "ok").sum())
    failed = len(items) - ok
    files = {"items": ITEMS, "heads": HEADS, "aggregate": f"{AGGREGATE}/", "page": f"{AGGREGATE}/index.html"}
    if args.attribute:
        files["attribution"] = ATTRIBUTION
    if runs:
        files["runs"] = f"{RUNS}/"
    sweep.write_manifest(status="done" if not failed else "done with failures",
                         counts={"items": len(items), "ok": ok, "failed": failed}, files=files)
    took = time.perf_counter() - t_start
    log.info("sweep: %d items, %d ok, %d failed in %.1f s; wrote %s: items.parquet, heads.parquet%s, sweep/ "
             "(ranking, plots, index.html)", len(items), ok, failed, took, sweep.path,
             ", attribution.parquet" if args.attribute else "")
    if summary["ranking"]:
        log.info("most changed heads over the items (mean JS):")
        for r in summary["ranking"][:5]:
            rho = r["layer_spearman_js_iou_loss"]
            log.info("  %d. %s head %d  JS %.4g  layer Spearman rho vs IoU loss %s", r["rank"], r["layer_key"],
                     r["head"], r["js_mean_mean"] or float("nan"), "n/a" if rho is None else f"{rho:.3f}")
    if summary["attribution_ranking"]:
        log.info("layers whose quantization costs most (attribution, mean delta IoU):")
        for r in summary["attribution_ranking"][:5]:
            log.info("  %d. %s  %+.4f", r["rank"], r["unit"], r["delta_iou_mean"] or 0.0)
    if failed:
        log.error("sweep: %d of %d items failed (their reasons: items.parquet, columns status and error)", failed,
                  len(items))
    return {"total": len(items), "ok": ok, "failed": failed, "path": str(sweep.path)}
