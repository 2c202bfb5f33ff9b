"""Build SAM 2 as users have it: a Hydra config (package name or YAML file) plus a `.pt` checkpoint."""

from __future__ import annotations

import contextlib
import difflib
import http.client
import io
import logging
import math
import os
import re
import threading
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sam2_layerwise._yaml import check_interpolations, read_yaml
from sam2_layerwise.errors import ModelError, condense, few

log = logging.getLogger(__name__)

# The overrides `sam2.build_sam.build_sam2` applies by default, so users get the model they know.
POSTPROCESSING = {
    "model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability": True,
    "model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta": 0.05,
    "model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh": 0.98,
}

MAX_IMAGE_SIZE = 4096  # SAM 2 runs at 1024; 4096 is 16x its tokens (cli.common.image_size says the same)
QUANT_ENTRY = "quantization"  # where a quantized checkpoint keeps its quantizers (quant.checkpoint.ENTRY)
CONFIG_MAX_BYTES = 4 << 20  # SAM 2's configs are a few KiB; anything near this is not a model config

# Official checkpoints: model id -> (config name, download URL).
_BASE_21 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
_BASE_20 = "https://dl.fbaipublicfiles.com/segment_anything_2/072824/"
OFFICIAL = {
    f"sam2.1_hiera_{size}": (f"configs/sam2.1/sam2.1_hiera_{short}.yaml", f"{_BASE_21}sam2.1_hiera_{size}.pt")
    for size, short in (("tiny", "t"), ("small", "s"), ("base_plus", "b+"), ("large", "l"))
} | {
    f"sam2_hiera_{size}": (f"configs/sam2/sam2_hiera_{short}.yaml", f"{_BASE_20}sam2_hiera_{size}.pt")
    for size, short in (("tiny", "t"), ("small", "s"), ("base_plus", "b+"), ("large", "l"))
}


def _sam2_root() -> Path:
    import sam2

    return Path(sam2.__path__[0])


def known_config_names() -> list[str]:
    root = _sam2_root()
    return sorted(str(p.relative_to(root)) for p in (root / "configs").rglob("*.yaml"))


def resolve_config(config: str) -> Path:
    """A config name the sam2 package knows (`configs/sam2.1/sam2.1_hiera_t.yaml`, also without
    `configs/` or `.yaml`) or a YAML file on disk -> the YAML file's path."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    names = known_config_names()
    root = _sam2_root()
    for candidate in (config, f"configs/{config}", f"{config}.yaml", f"configs/{config}.yaml"):
        if candidate in names:
            return root / candidate
    by_base = [n for n in names if Path(n).name in (config, f"{config}.yaml")]
    if len(by_base) == 1:
        return root / by_base[0]
    close = difflib.get_close_matches(config, names, n=4, cutoff=0.5) or by_base
    hint = f"; close names: {', '.join(close)}" if close else f"; known names: {', '.join(names[:8])}, ..."
    raise ModelError(f"not a YAML file and not a config the sam2 package knows{hint}", flag="--config", value=config)


def load_config(config: str, overrides: dict | None = None):
    """The model section of a SAM 2 config, with `build_sam2`'s post-processing overrides applied.

    The YAML is read with limits first (CONFIG_MAX_BYTES, nesting, alias expansion, duplicate keys, how far
    `${...}` interpolations expand), then handed to OmegaConf as the same text.
    """
    path = resolve_config(config)
    text, data = read_yaml(path, flag="--config", value=config, error=ModelError, max_bytes=CONFIG_MAX_BYTES)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or "_target_" not in data["model"]:
        raise ModelError("not a SAM 2 model config (no model._target_)", flag="--config", value=config)
    check_interpolations(data, limit=CONFIG_MAX_BYTES, flag="--config", value=config, error=ModelError)
    try:
        cfg = OmegaConf.load(io.StringIO(text))
        for key, value in {**POSTPROCESSING, **(overrides or {})}.items():
            OmegaConf.update(cfg, key, value, force_add=True)
        OmegaConf.resolve(cfg)
    except Exception as exc:  # OmegaConf's own errors: a bad interpolation, an unsupported value
        raise ModelError(f"cannot read as an OmegaConf config: {condense(exc)}", flag="--config", value=config) from None
    return cfg


def available_devices() -> list[str]:
    """The devices this machine can run on, as --device spells them."""
    out = ["cpu"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        out += ["cuda"] + [f"cuda:{i}" for i in range(n)]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        out.append("mps")
    return out


def pick_device(device: str = "auto") -> torch.device:
    """`--device`: auto (cuda, then mps, then cpu), or cpu / cuda / cuda:N / mps when this machine has it.
    Other torch device types (meta, xpu, vulkan, ...) are refused: the model must really run there."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    have = available_devices()
    shown = ", ".join(["auto", *have[:6]]) + (", ..." if len(have) > 6 else "")
    if not isinstance(device, str) or not re.fullmatch(r"cpu|mps|cuda(:\d{1,3})?", device):
        raise ModelError(f"not a device this tool runs on; this machine has: {shown}", flag="--device", value=device)
    if device not in have:
        why = ("CUDA is not available on this machine" if device.startswith("cuda") and not torch.cuda.is_available()
               else f"there is no CUDA device {device.split(':')[1]} ({torch.cuda.device_count()} visible)"
               if device.startswith("cuda:") else "MPS (Apple GPU) is not available on this machine")
        raise ModelError(f"{why}; this machine has: {shown}", flag="--device", value=device)
    return torch.device(device)


def cache_dir() -> Path:
    return Path(os.environ.get("SAM2_LAYERWISE_CACHE", Path.home() / ".cache" / "sam2_layerwise"))


def resolve_checkpoint(checkpoint: str) -> Path:
    """A checkpoint path, or an official model id (`sam2.1_hiera_tiny`, `facebook/sam2.1-hiera-tiny`)
    downloaded once into the cache."""
    path = Path(checkpoint).expanduser()
    if path.exists():
        if not path.is_file():
            raise ModelError("is not a file", flag="--checkpoint", value=checkpoint)
        return path
    model_id = official_id(checkpoint)
    if model_id is None:
        close = difflib.get_close_matches(checkpoint, list(OFFICIAL), n=3, cutoff=0.6)
        hint = f" (did you mean the model id {', '.join(close)}?)" if close else ""
        raise ModelError(f"no such file and not an official model id{hint}", flag="--checkpoint", value=checkpoint)
    target = cache_dir() / f"{model_id}.pt"
    if target.is_file():
        return target
    url = OFFICIAL[model_id][1]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"the download cache {target.parent} cannot be used ({condense(exc)}); set "
                         f"SAM2_LAYERWISE_CACHE to a writable directory", flag="--checkpoint", value=checkpoint) from None
    log.info("downloading %s to %s", url, target)
    try:
        torch.hub.download_url_to_file(url, str(target) + ".part", progress=True)
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as exc:
        raise ModelError(f"download from {url} failed ({condense(exc)}); with no network, fetch that file "
                         f"elsewhere and pass its path", flag="--checkpoint", value=checkpoint) from None
    os.replace(str(target) + ".part", target)
    return target


def official_id(name: str) -> str | None:
    norm = name.removeprefix("facebook/").replace("-", "_").removesuffix(".pt")
    return norm if norm in OFFICIAL else None


def read_checkpoint(path: Path, flag: str = "--checkpoint") -> dict:
    """The whole SAM 2 checkpoint dict, `torch.load(weights_only=True)`; it must hold a `model` state dict of
    dense tensors. Zip-format files are memory-mapped, so a quantized checkpoint's extra entries cost no copy."""
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001 - whatever the file holds, it is the file's problem
        raise ModelError(_load_refusal(exc, path) + _cached_hint(path), flag=flag, value=str(path)) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ModelError("not a SAM 2 checkpoint: expected a dict with a 'model' state dict" + _cached_hint(path),
                         flag=flag, value=str(path))
    for key, value in ckpt["model"].items():
        if not isinstance(key, str):
            raise ModelError(f"'model' has a key {key!r} that is not a string; a SAM 2 state dict is keyed by "
                             f"parameter names" + _cached_hint(path), flag=flag, value=str(path))
        problem = _tensor_problem(value)
        if problem:
            raise ModelError(f"'model' entry {key} {problem}; a SAM 2 state dict holds dense tensors only"
                             + _cached_hint(path), flag=flag, value=str(path))
    return ckpt


def _load_refusal(exc: BaseException, path: Path | None = None) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line: not a PyTorch file at all (neither torch's
    zip archive nor a pickle), the global it would not import (a pickled class, function or `os.system`
    reference), or the loader's own reason without its boilerplate."""
    head = None
    try:
        if path is not None:
            with open(path, "rb") as f:
                head = f.read(2)
    except OSError:
        pass
    if head and head != b"PK" and head[:1] != b"\x80":  # zip magic; pickle protocol 2+ opcode
        return "is not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle)"
    text = str(exc)
    found = re.search(r"\bGLOBAL ([\w.]+)", text)
    if found:
        return f"contains code or objects that cannot be loaded safely (weights_only=True refused GLOBAL {found[1]})"
    if "Weights only load failed" in text:  # torch's advice paragraphs around the one line that says why
        reason = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
        why = [p for p in re.split(r"\n\s*\n", text) if p.strip() and not p.lstrip().startswith(
            ("Weights only load failed", "Check the documentation"))]
        detail = reason[1] if reason else why[0] if why else "unsupported content"
        return f"contains code or objects that cannot be loaded safely (weights_only=True refused it: {condense(detail)})"
    if isinstance(exc, EOFError):
        return "ends before its data does (an empty or cut-short file)"
    return f"cannot be loaded with torch.load(weights_only=True): {condense(exc)}"


def _cached_hint(path: Path) -> str:
    """For a file in our download cache: which file to delete so the next run downloads it again."""
    try:
        cached = Path(path).resolve().parent == cache_dir().expanduser().resolve()
    except OSError:
        cached = False
    return f"; it is a cached download: delete {path} and run again to download it afresh" if cached else ""


def _tensor_problem(value) -> str | None:
    """Why a state-dict value is not a plain dense tensor (None when it is)."""
    if not isinstance(value, torch.Tensor):
        return f"is a {type(value).__name__}, not a tensor"
    if value.layout != torch.strided:
        return f"is a {str(value.layout).removeprefix('torch.')} tensor"
    if value.is_quantized:
        return "is a quantized tensor"
    if value.is_meta:
        return "is a meta tensor (it has no values)"
    if getattr(value, "is_nested", False):
        return "is a nested tensor"
    return None


def read_state_dict(path: Path, flag: str = "--checkpoint") -> dict:
    """`torch.load(weights_only=True)` of a SAM 2 checkpoint -> its `model` state dict."""
    return read_checkpoint(path, flag)["model"]


_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def skip_init():
    """torch.nn.init's in-place initialisers (what every Linear, Conv and LayerNorm runs when it is built) do nothing
    inside: for a model whose every parameter and buffer the checkpoint then sets (`check_state_dict` refuses
    missing keys), random initialisation is work thrown away, 0.5 s of a b+ model's 0.6 s of construction.
    Non-persistent buffers (RoPE frequencies) are computed by the constructors, not by these functions, so the
    model is the same bit for bit once loaded (tests/unit/test_skip_init.py). The functions are module attributes
    of torch.nn.init: the lock keeps two threads from swapping them at once."""
    names = [n for n in vars(torch.nn.init) if n.endswith("_") and not n.startswith("_")
             and callable(getattr(torch.nn.init, n))]
    with _INIT_LOCK:
        saved = {n: getattr(torch.nn.init, n) for n in names}
        try:
            for n in names:
                setattr(torch.nn.init, n, _leave)
            yield
        finally:
            for n, f in saved.items():
                setattr(torch.nn.init, n, f)


def _leave(tensor, *args, **kwargs):
    return tensor


def check_state_dict(model: torch.nn.Module, state: dict, flag: str, value: str) -> None:
    """Raise naming the keys that are missing, unexpected or of the wrong shape."""
    own = model.state_dict()
    for k, v in state.items():  # after adapt_state: what is left must all be weights
        problem = _tensor_problem(v)
        if problem is None and k in own and own[k].is_floating_point() and not v.is_floating_point():
            problem = f"holds {str(v.dtype).removeprefix('torch.')} values where the model has floating point"
        if problem:
            raise ModelError(f"'model' entry {k} {problem}", flag=flag, value=value)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {few(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} keys of the wrong shape: {few(wrong)}")
    if problems:
        raise ModelError("does not fit the config: " + "; ".join(problems), flag=flag, value=value)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config_path: Path
    checkpoint_path: Path | None
    device: torch.device
    random_init: bool
    overrides: dict | None = None  # the config overrides it was built with (image size)

    def describe(self) -> dict:
        # the checkpoint as an absolute path, as summaries and manifests give the image: a run explains itself from
        # any working directory
        return {"config": str(self.config_path),
                "checkpoint": str(Path(self.checkpoint_path).absolute()) if self.checkpoint_path else None,
                "random_init": self.random_init, "device": str(self.device), "image_size": int(self.model.image_size),
                "parameters": sum(p.numel() for p in self.model.parameters())}


def build_model(config: str | None, checkpoint: str | None = None, *, random_init: bool = False,
                device: str = "auto", seed: int = 0, overrides: dict | None = None,
                adapt_state=None, quantized: bool = False, checkpoint_data: dict | None = None,
                reuse: LoadedModel | None = None) -> LoadedModel:
    """Build a SAM 2 model in eval mode.

    config: package config name or YAML path (may be None when `checkpoint` is an official model id).
    checkpoint: `.pt` path or official model id. random_init: run on seeded random weights (explicit only).
    adapt_state(model, state) -> state: a chance to take entries that are not SAM 2 weights out of the state
    dict (a QAT trainer's quantizer parameters) once the model is built, before the state is checked.
    quantized: the caller installs the checkpoint's quantizers (`quant.load_quantized_model`); otherwise a
    checkpoint that carries them runs as the float model it also is, and a warning says so.
    checkpoint_data: the checkpoint's contents when the caller has read them already (not read a second time).
    reuse: a model built earlier from the same config, overrides and device, whose modules take this checkpoint's
    weights instead of a second model being built (compare's second half: half a second of construction and
    random initialisation saved, one model in memory). Its weights are overwritten; ignored when the
    architecture could differ.
    """
    if checkpoint is None and not random_init:
        raise ModelError("no weights given: pass --checkpoint PATH_OR_MODEL_ID, or --random-init to run on "
                         "random weights on purpose", flag="--checkpoint")
    if checkpoint is not None and random_init:
        raise ModelError("give either a checkpoint or --random-init, not both", flag="--random-init")
    if config is None:
        model_id = official_id(checkpoint or "")
        if model_id is None:
            raise ModelError("missing: give a SAM 2 config (e.g. configs/sam2.1/sam2.1_hiera_b+.yaml)", flag="--config")
        config = OFFICIAL[model_id][0]
    dev = pick_device(device)
    cfg = load_config(config, overrides)
    _check_config_image_size(cfg, "--image-size" if overrides and "model.image_size" in overrides else "--config",
                             config)
    ckpt_path = resolve_checkpoint(checkpoint) if checkpoint is not None else None
    if checkpoint_data is not None:
        ckpt = checkpoint_data
    else:
        ckpt = read_checkpoint(ckpt_path) if ckpt_path is not None else None
    state = ckpt["model"] if ckpt is not None else None
    if ckpt is not None and QUANT_ENTRY in ckpt and not quantized:
        entry = ckpt[QUANT_ENTRY]
        count = len(entry.get("quantizers") or {}) if isinstance(entry, dict) else 0
        log.warning("checkpoint %s carries quantization parameters (%d quantizers); running it as a FLOAT model "
                    "(its float weights). To run it quantized, give the quantization config it was made with "
                    "(visualize: --adaptive-qat-config; compare: as --checkpoint-quantized with --config-quantized)",
                    checkpoint, count)
    if state is not None:
        warn_nonfinite(state, str(checkpoint))

    from hydra.utils import instantiate

    torch.manual_seed(seed)
    if (reuse is not None and state is not None and reuse.config_path == resolve_config(config)
            and (reuse.overrides or None) == (overrides or None) and reuse.device == dev):
        model = reuse.model
    else:
        try:
            with skip_init() if state is not None else contextlib.nullcontext():
                model = instantiate(cfg.model, _recursive_=True)
        except Exception as exc:  # noqa: BLE001 - hydra wraps whatever the constructors raised
            raise ModelError(f"the sam2 package cannot build this config: {condense(exc)}",
                             flag="--config", value=config) from None
    if getattr(model, "compile_image_encoder", False):
        raise ModelError("compile_image_encoder=True: torch.compile'd encoders run capture hooks badly; "
                         "set it to False", flag="--config", value=config)
    if state is not None:
        if adapt_state is not None:
            state = adapt_state(model, state)
        check_state_dict(model, state, "--checkpoint", str(checkpoint))
        model.load_state_dict(state)
    else:
        log.warning("RANDOM WEIGHTS: --random-init was given, the model is randomly initialised (seed %d); "
                    "its masks and attention mean nothing about real SAM 2 behaviour", seed)
    model = model.to(dev).eval()
    return LoadedModel(model=model, config_path=resolve_config(config), checkpoint_path=ckpt_path, device=dev,
                       random_init=state is None, overrides=dict(overrides) if overrides else None)


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors in a state dict that hold NaN or inf."""
    from sam2_layerwise.finite import nonfinite

    return nonfinite(state)


def warn_nonfinite(state: dict, checkpoint: str) -> None:
    """A checkpoint with NaN/inf weights still runs (what it does is the finding); say so once, at load."""
    bad = nonfinite_tensors(state)
    if bad:
        log.warning("checkpoint %s holds non-finite values (NaN/inf) in %d tensors, first %s; running it anyway, "
                    "the summary's 'nonfinite' section says where they first reach the computation",
                    checkpoint, len(bad), bad[0])


def _check_config_image_size(cfg, flag: str, config: str) -> None:
    """image_size (the config's or --image-size) before anything is built: a whole number in
    [32, MAX_IMAGE_SIZE] that the Hiera's first-stage windows tile (a model of 10**9 pixels is never built)."""
    size = OmegaConf.select(cfg, "model.image_size", default=None)
    shown = config if flag == "--config" else size
    if isinstance(size, bool) or not isinstance(size, int):
        raise ModelError(f"model.image_size is {size!r}, not a whole number", flag=flag, value=shown)
    if not 32 <= size <= MAX_IMAGE_SIZE:
        raise ModelError(f"image_size {size} is outside 32..{MAX_IMAGE_SIZE} (SAM 2's own is 1024)", flag=flag,
                         value=shown)
    window = OmegaConf.select(cfg, "model.image_encoder.trunk.window_spec", default=None)
    first = window[0] if OmegaConf.is_list(window) and len(window) and type(window[0]) is int else 8  # Hiera's default
    step = math.lcm(32, 4 * max(1, first))
    if size % step:
        raise ModelError(f"image_size must be a multiple of {step} for this Hiera (stride 32, first window "
                         f"{first} tokens of 4 px); e.g. {max(step, size // step * step)}", flag=flag, value=shown)


def save_checkpoint(model: torch.nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Write `{"model": state_dict}` (SAM 2's own format), atomically."""
    from sam2_layerwise.store.atomic import atomic_torch_save

    return atomic_torch_save({"model": model.state_dict(), **(extra or {})}, Path(path), remember_hash=True)
