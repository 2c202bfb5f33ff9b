"""compare/generate bad input: one line naming the flag and value, exit 2, nothing written or changed."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from sam2_layerwise.cli.main import main
from tests.analysis.conftest import EXAMPLES, compare_args
from tests.conftest import CHELSEA, TINY_CONFIG
from tests.store.test_run_writer import snapshot


def one_line(capsys, *needles):
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(err) == 1, err
    for n in needles:
        assert n in err[0], (n, err[0])


@pytest.mark.parametrize("mode, needles", [
    (["--save-raw", "--save-full-attn"], ["--save-full-attn", "not allowed with", "--save-raw"]),
    ([], ["--save-raw", "--save-full-attn", "required"]),
    (["--save-raw", "--full-dtype", "fp16"], ["--full-dtype fp16", "--save-full-attn"]),
])
def test_compare_modes(tmp_path, tiny_checkpoint, quant_checkpoints, capsys, mode, needles):
    cfg, ckpt = quant_checkpoints["w8a8"]
    args = compare_args(tiny_checkpoint, cfg, ckpt, tmp_path / "out", *mode[:1])
    args = [a for a in args if a not in ("--save-raw",)] + mode
    assert main(args) == 2
    one_line(capsys, *needles)
    assert not (tmp_path / "out").exists()


def test_compare_quantized_checkpoint_that_does_not_fit(tmp_path, tiny_checkpoint, quant_checkpoints, capsys):
    cfg, _ = quant_checkpoints["w8a8"]
    _, other = quant_checkpoints["w4a8_mixed"]  # w4a8's checkpoint under the w8a8 config: bits do not fit
    assert main(compare_args(tiny_checkpoint, cfg, other, tmp_path / "out")) == 2
    one_line(capsys, "--checkpoint-quantized")
    assert not (tmp_path / "out").exists()
    # the float checkpoint as the quantized one: no learned scales
    assert main(compare_args(tiny_checkpoint, cfg, tiny_checkpoint, tmp_path / "out")) == 2
    one_line(capsys, "--checkpoint-quantized")
    assert not (tmp_path / "out").exists()


def test_compare_base_config_disagrees(tmp_path, tiny_checkpoint, quant_checkpoints, capsys):
    _, ckpt = quant_checkpoints["w8a8"]
    cfg = tmp_path / "q.yaml"
    cfg.write_text((EXAMPLES / "w8a8.yaml").read_text() + "base_config: configs/sam2.1/sam2.1_hiera_b+.yaml\n")
    assert main(compare_args(tiny_checkpoint, cfg, ckpt, tmp_path / "out")) == 2
    one_line(capsys, "--config-original", "base_config")
    assert not (tmp_path / "out").exists()


def test_compare_over_a_good_run_that_fails_keeps_it(tmp_path, tiny_checkpoint, quant_checkpoints, compare_runs,
                                                      capsys):
    run = tmp_path / "run"
    shutil.copytree(compare_runs["w8a8", "raw"], run)
    before = snapshot(run)
    cfg, _ = quant_checkpoints["w8a8"]
    args = compare_args(tiny_checkpoint, cfg, tiny_checkpoint, run)  # fails at the quantized half's loading
    assert main(args) == 2
    assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # and a visualize run directory is not a compare run to write over
    vis = tmp_path / "vis"
    assert main(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--image",
                 str(CHELSEA), "--points", "10", "10", "1", "--output-dir", str(vis), "-q"]) == 0
    capsys.readouterr()
    assert main(compare_args(tiny_checkpoint, *quant_checkpoints["w8a8"], vis)) == 2
    one_line(capsys, "--output-dir", "another kind")


def test_failure_writing_the_float_half_in_the_background(tmp_path, tiny_checkpoint, quant_checkpoints,
                                                          compare_runs, monkeypatch, capsys):
    """The float half is written by a background thread while the quantized half runs: an error there (a full
    disk) fails the compare once the quantized half is captured, the previous run stays byte-identical and no
    staging folder is left behind, even with the thread still writing when the main thread fails."""
    import threading

    from sam2_layerwise.store import image_run

    run = tmp_path / "run"
    shutil.copytree(compare_runs["w8a8", "raw"], run)
    before = snapshot(run)
    real = image_run.write_attention_tensors
    threads = []

    def disk_full(writer, record, opts):
        threads.append(threading.current_thread().name)
        if "original" in str(writer.path("predictions.pt")):
            raise OSError(28, "No space left on device")
        return real(writer, record, opts)

    monkeypatch.setattr(image_run, "write_attention_tensors", disk_full)
    assert main(compare_args(tiny_checkpoint, *quant_checkpoints["w8a8"], run)) != 0
    assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert threads and threads[0].startswith("compare-write")
    capsys.readouterr()

    # the main thread fails (the quantized half) while the float half is still being written: the writer waits
    # for the thread before it removes the staging folder
    release = threading.Event()

    def slow(writer, record, opts):
        release.wait(5)
        return real(writer, record, opts)

    from sam2_layerwise.analysis import pair

    real_build = pair._build

    def failing_build(spec, args, reuse=None):
        if spec.qcfg is not None:
            threading.Timer(0.3, release.set).start()
            raise pair.CaptureError("quantized half failed", flag="--checkpoint-quantized", value="x")
        return real_build(spec, args, reuse=reuse)

    monkeypatch.setattr(image_run, "write_attention_tensors", slow)
    monkeypatch.setattr(pair, "_build", failing_build)
    assert main(compare_args(tiny_checkpoint, *quant_checkpoints["w8a8"], run)) == 2
    assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.fixture
def run_copy(tmp_path, compare_runs):
    run = tmp_path / "run"
    shutil.copytree(compare_runs["w8a8", "raw"], run)
    return run


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _drop_tensor(run):
    s = json.loads((run / "quantized" / "layerwise_summary.json").read_text())
    (run / "quantized" / s["attention"][2]["files"]["attn"]).unlink()


def _escape(run):
    def fn(s):
        s["attention"][0]["files"]["attn"] = "../../../etc/passwd"
    _edit_json(run / "original" / "layerwise_summary.json", fn)


def _replace_pt(path, data):
    path.unlink()  # a hard link would be written through
    torch.save(data, path)


def _edit_pt(path, fn):
    data = torch.load(path, weights_only=True)
    fn(data)
    _replace_pt(path, data)


def _scale_rows(run, factor):
    """The original half's first saved attention rows multiplied by `factor` (no longer probabilities)."""
    import torch

    s = json.loads((run / "original" / "layerwise_summary.json").read_text())
    path = run / "original" / s["attention"][0]["files"]["attn"]
    data = torch.load(path, weights_only=True)
    data["probs"] = data["probs"] * factor
    path.unlink()  # a hard link shared with attn_tensors/all/: replaced, not written through
    torch.save(data, path)


@pytest.mark.parametrize("damage, extra, needles", [
    (lambda r: shutil.rmtree(r / "quantized"), [], ["--run_dir", "quantized/layerwise_summary.json is missing"]),
    (_drop_tensor, [], ["--run_dir", "truncated", "__attn.pt is missing"]),
    (lambda r: (r / "original" / "predictions.pt").write_bytes(b"junk"), [], ["--run_dir", "predictions.pt"]),
    (lambda r: _edit_json(r / "manifest.json", lambda m: m.update(schema_version=99)), [],
     ["--run_dir", "schema version 99", "newer"]),
    (lambda r: _edit_json(r / "quantized" / "layerwise_summary.json",
                          lambda s: s["prompts"]["points"][0].__setitem__(0, 1.0)), [],
     ["--run_dir", "different prompts"]),
    (lambda r: _edit_json(r / "quantized" / "layerwise_summary.json",
                          lambda s: s["image"].update(sha256="0" * 64)), [], ["--run_dir", "different images"]),
    (_escape, [], ["--run_dir", "outside the run"]),
    (lambda r: None, ["--layers", "image_encoder_trunk_blocks_40"], ["--layers", "matches no layer"]),
    (lambda r: None, ["--heads", "9"], ["--heads 9", "at most 8 heads"]),
    (lambda r: None, ["--heads", "x"], ["--heads x"]),
    (lambda r: None, ["--output", "../elsewhere"], ["--output ../elsewhere"]),
    # forged fields of the manifest and the summaries: one line naming the run, never an internal error
    (lambda r: _edit_json(r / "manifest.json", lambda m: m.update(mode=["light"])), [], ["--run_dir", "mode"]),
    (lambda r: _edit_json(r / "manifest.json", lambda m: m.update(models="x")), [], ["--run_dir", "'models'"]),
    (lambda r: _edit_json(r / "manifest.json", lambda m: m["models"].update(quantized=[1, 2])), [],
     ["--run_dir", "'models'"]),
    (lambda r: _edit_json(r / "manifest.json", lambda m: m.update(quantization_config=5)), [],
     ["--run_dir", "quantization_config"]),
    (lambda r: _edit_json(r / "manifest.json", lambda m: m.update(halves=["original/"])), [],
     ["--run_dir", "'halves'"]),
    (lambda r: _edit_json(r / "manifest.json", lambda m: m["halves"].update(quantized="../x/")), [],
     ["--run_dir", "'halves'"]),
    (lambda r: _edit_json(r / "manifest.json", lambda m: m.update(attention_calls=-3)), [],
     ["--run_dir", "'attention_calls' -3"]),
    (lambda r: _edit_json(r / "manifest.json", lambda m: m.update(attention_calls=m["attention_calls"] - 1)), [],
     ["--run_dir", "attention calls where manifest.json says"]),
    (lambda r: _edit_json(r / "manifest.json", lambda m: m.update(attention_calls="31")), [],
     ["--run_dir", "'attention_calls' '31'"]),
    (lambda r: _edit_json(r / "manifest.json", lambda m: m.update(full_dtype="float64")), [],
     ["--run_dir", "'full_dtype' 'float64'", "light mode"]),
    (lambda r: _edit_json(r / "manifest.json", lambda m: m["image"].update(width=True)), [],
     ["--run_dir", "image width True"]),
    (lambda r: _edit_json(r / "manifest.json", lambda m: m["image"].update(height=-1)), [],
     ["--run_dir", "image height -1"]),
    (lambda r: (r / "manifest.json").write_text("[" * 100000 + "]" * 100000), [],
     ["--run_dir", "manifest.json cannot be read (RecursionError)"]),
    (lambda r: _edit_json(r / "quantized" / "layerwise_summary.json", lambda s: s.update(compare="x")), [],
     ["--run_dir", "'compare'"]),
    (lambda r: _edit_json(r / "original" / "layerwise_summary.json", lambda s: s.update(capture_options=[5])), [],
     ["--run_dir", "'capture_options'"]),
    (lambda r: _edit_json(r / "quantized" / "layerwise_summary.json",
                          lambda s: s["compare"].update(errors=[1])), [], ["--run_dir", "'errors'"]),
    (lambda r: _edit_json(r / "quantized" / "layerwise_summary.json",
                          lambda s: s["compare"]["errors"].update({s["attention"][0]["file_stem"]: "x"})), [],
     ["--run_dir", "compare.errors of image_encoder_trunk_blocks_0 is malformed"]),
    (lambda r: _edit_json(r / "quantized" / "layerwise_summary.json", lambda s: s.update(schema_version=999)), [],
     ["--run_dir", "quantized/layerwise_summary.json is schema version 999", "newer"]),
    (lambda r: _edit_json(r / "original" / "layerwise_summary.json",
                          lambda s: s["attention"][0]["files"].update(attn="/etc/passwd")), [],
     ["--run_dir", "outside the run", "/etc/passwd"]),
    # one half's summary naming the other half's files: a half compared with itself would look unchanged
    (lambda r: _edit_json(r / "quantized" / "layerwise_summary.json",
                          lambda s: s["prediction"].update(file="../original/predictions.pt")), [],
     ["--run_dir", "outside the run", "quantized/../original/predictions.pt"]),
    (lambda r: _edit_json(r / "quantized" / "layerwise_summary.json",
                          lambda s: s["attention"][0]["files"].update(
                              attn="../original/" + s["attention"][0]["files"]["attn"])), [],
     ["--run_dir", "outside the run"]),
    (lambda r: _replace_pt(r / "quantized" / "predictions.pt", torch.zeros(3)), [],
     ["--run_dir", "quantized/predictions.pt does not hold a predictions dict"]),
    (lambda r: _edit_pt(r / "quantized" / "predictions.pt",
                        lambda d: d.update(low_res_logits=d["low_res_logits"].to(torch.complex64))), [],
     ["--run_dir", "predictions cannot be compared", "low_res_logits must be a real dense CPU tensor"]),
    (lambda r: [_edit_json(r / h / "layerwise_summary.json", lambda s: s.update(attention=[]))
                for h in ("original", "quantized")] + [_edit_json(r / "manifest.json",
                                                                   lambda m: m.update(attention_calls=0))], [],
     ["--run_dir", "captured no attention layer"]),
    (lambda r: _edit_json(r / "quantized" / "layerwise_summary.json",
                          lambda s: s["attention"][1]["queries"][0].update(index=s["attention"][1]["queries"][0]["index"] + 1)),
     [], ["--run_dir", "selected different query tokens", "image_encoder_trunk_blocks_1"]),
    (lambda r: _edit_pt(r / "quantized" / json.loads((r / "quantized" / "layerwise_summary.json").read_text())
                        ["attention"][0]["files"]["attn"], lambda d: d["query_stats"]["max_prob"].fill_(1e30)), [],
     ["--run_dir", "max_prob statistics lie outside [0, 1]"]),
    (lambda r: _edit_pt(r / "original" / json.loads((r / "original" / "layerwise_summary.json").read_text())
                        ["attention"][0]["files"]["attn"], lambda d: d["query_stats"]["topk_mass"].fill_(1.25)), [],
     ["--run_dir", "topk_mass statistics lie outside [0, 1]"]),  # a softmax's mass: at most 1
    (lambda r: [_edit_json(r / h / "layerwise_summary.json", lambda s: s["attention"][2].update(
        layer_key=s["attention"][1]["layer_key"], call_index=s["attention"][1].get("call_index", 0)))
        for h in ("original", "quantized")], [], ["--run_dir", "lists an attention call twice"]),
    (lambda r: [shutil.move(r / "quantized", r.parent / "q_elsewhere"), (r / "quantized").symlink_to(
        r.parent / "q_elsewhere")], [], ["--run_dir", "quantized/ is a link to", "outside the run"]),
    (lambda r: _edit_json(r / "quantized" / "layerwise_summary.json", lambda s: next(iter(
        s["compare"]["errors"].values()))["q_rel_err"].__setitem__(0, -1.0)), [],
     ["--run_dir", "compare.errors of", "is malformed"]),
    (lambda r: _scale_rows(r, -0.5), [], ["--run_dir", "not probabilities"]),
    (lambda r: _scale_rows(r, 1e3), [], ["--run_dir", "not probabilities"]),
    # selections
    (lambda r: None, ["--heads", ""], ["--heads", "is empty"]),
    (lambda r: None, ["--heads", " "], ["--heads", "is empty"]),
    (lambda r: None, ["--layers", ""], ["--layers", "is empty"]),
    (lambda r: None, ["--heads", "\u0663"], ["--heads"]),  # an Arabic-Indic 3 is not a head number
    (lambda r: None, ["--topk", "\u0663"], ["--topk", "not a whole number"]),
    (lambda r: None, ["--topk", "1_0"], ["--topk", "not a whole number"]),
    # the analysis never replaces the run's own data or the user's files
    (lambda r: None, ["--output", "manifest.json"], ["--output manifest.json", "compare run's own data"]),
    (lambda r: None, ["--output", "attribution.json"], ["--output attribution.json", "compare run's own data"]),
    (lambda r: (r / "notes.txt").write_text("mine"), ["--output", "notes.txt"], ["--output notes.txt", "not an analysis"]),
    (lambda r: ((r / "notes").mkdir(), (r / "notes" / "n.txt").write_text("mine")), ["--output", "notes"],
     ["--output notes", "not an analysis"]),
    (lambda r: (r / "elsewhere").symlink_to(r.parent), ["--output", "elsewhere"], ["--output elsewhere", "link"]),
])
def test_generate_refuses(run_copy, capsys, damage, extra, needles):
    damage(run_copy)
    before = snapshot(run_copy)
    assert main(["generate", "--run_dir", str(run_copy), *extra]) == 2
    one_line(capsys, *needles)
    assert snapshot(run_copy) == before


def test_generate_on_other_directories(tmp_path, capsys):
    assert main(["generate", "--run_dir", str(tmp_path / "nope")]) == 2
    one_line(capsys, "--run_dir", "not a directory")
    (tmp_path / "layerwise_summary.json").write_text("{}")
    assert main(["generate", "--run-dir", str(tmp_path)]) == 2
    one_line(capsys, "--run_dir", "not a compare run", "visualize")


def test_generate_replaces_its_own_analysis_folders(run_copy, capsys):
    """A second generate into the same --output replaces the first; an empty folder of that name is taken."""
    assert main(["generate", "--run_dir", str(run_copy), "--output", "again", "-q"]) == 0
    (run_copy / "again" / "metrics_heads.csv").write_text("stale")
    assert main(["generate", "--run_dir", str(run_copy), "--output", "again", "-q"]) == 0
    assert (run_copy / "again" / "metrics_heads.csv").read_text() != "stale"
    (run_copy / "empty").mkdir()
    assert main(["generate", "--run_dir", str(run_copy), "--output", "empty", "-q"]) == 0
    assert (run_copy / "empty" / "metrics.json").is_file()


@pytest.mark.parametrize("extra, needles", [
    (["--box", "1", "1", "50", "50", "--box", "2", "2", "60", "60"], ["--box 2 2 60 60", "given twice"]),
    (["--stats-topk", "0"], ["--stats-topk 0", "greater than 0"]),
    (["--layers", ""], ["--layers", "is empty"]),
    (["--max-attn-queries", "\u0663"], ["--max-attn-queries", "not a whole number"]),
])
def test_compare_refuses_ambiguous_flags(tmp_path, tiny_checkpoint, quant_checkpoints, capsys, extra, needles):
    args = compare_args(tiny_checkpoint, *quant_checkpoints["w8a8"], tmp_path / "out") + extra
    assert main(args) == 2
    one_line(capsys, *needles)
    assert not (tmp_path / "out").exists()


def test_a_new_compare_drops_every_old_analysis_and_keeps_the_users_files(run_copy, tiny_checkpoint,
                                                                           quant_checkpoints):
    """Analyses describe the capture they were made from: a new compare over the run removes each one `generate`
    wrote (any --output name), and leaves the user's own files and folders as they were."""
    assert main(["generate", "--run_dir", str(run_copy), "--output", "analysis_decoder", "-q"]) == 0
    (run_copy / "notes").mkdir()
    (run_copy / "notes" / "metrics.json").write_text('{"schema": "mine"}')
    (run_copy / "NOTES.md").write_text("mine")
    for half in ("original", "quantized"):  # inside the halves too, as visualize keeps them in its own run
        (run_copy / half / "NOTES.md").write_text(f"mine, {half}")
        (run_copy / half / "my_plots").mkdir()
        (run_copy / half / "my_plots" / "a.png").write_bytes(b"mine")
    assert (run_copy / "original" / "attn_tensors").is_dir()
    (run_copy / "original" / "attn_overlays").mkdir(exist_ok=True)  # the tool's own name: the old capture's
    assert main(compare_args(tiny_checkpoint, *quant_checkpoints["w8a8"], run_copy)) == 0
    assert not (run_copy / "analysis_decoder").exists()
    assert (run_copy / "notes" / "metrics.json").read_text() == '{"schema": "mine"}'
    assert (run_copy / "NOTES.md").read_text() == "mine"
    for half in ("original", "quantized"):
        assert (run_copy / half / "NOTES.md").read_text() == f"mine, {half}"
        assert (run_copy / half / "my_plots" / "a.png").read_bytes() == b"mine"
    assert not (run_copy / "original" / "attn_overlays").exists()
    assert main(["generate", "--run_dir", str(run_copy), "-q"]) == 0  # the new capture reads as one


def test_a_quantized_rows_raw_mass_may_pass_1(run_copy):
    """A log2 probability quantizer rounds anything above 2^-0.5 up to 1, so a quantized row's raw top-k mass may
    pass 1: generate takes it (it refused such runs as damaged), and so does a sweep's shard check."""
    from sam2_layerwise.sweep.store import _bounds

    rel = json.loads((run_copy / "quantized" / "layerwise_summary.json").read_text())["attention"][0]["files"]["attn"]
    _edit_pt(run_copy / "quantized" / rel, lambda d: d["query_stats"]["topk_mass"].fill_(1.25))
    assert main(["generate", "--run_dir", str(run_copy), "-q"]) == 0
    heads = pd.read_csv(run_copy / "analysis" / "metrics_heads.csv")
    assert heads["all_queries_topk_mass_q"].max() > 1.0
    for column in ("topk_mass_q", "q_mass_on_fp_topk", "all_queries_topk_mass_q"):
        assert _bounds(column)[1] == float("inf")
    assert _bounds("topk_mass_fp")[1] < 1.01 and _bounds("all_queries_topk_mass_fp")[1] < 1.01
