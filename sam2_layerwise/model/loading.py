"""Build SAM 2 as users have it: a Hydra config (package name or YAML file) plus a `.pt` checkpoint."""

from __future__ import annotations

import difflib
import logging
import math
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sam2_layerwise.errors import ModelError, few

log = logging.getLogger(__name__)

# The overrides `sam2.build_sam.build_sam2` applies by default, so users get the model they know.
POSTPROCESSING = {
    "model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability": True,
    "model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta": 0.05,
    "model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh": 0.98,
}

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
    """The model section of a SAM 2 config, with `build_sam2`'s post-processing overrides applied."""
    path = resolve_config(config)
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry their own line numbers
        raise ModelError(f"cannot read YAML: {exc}".splitlines()[0], flag="--config", value=config) from None
    if "model" not in cfg or "_target_" not in cfg.model:
        raise ModelError("not a SAM 2 model config (no model._target_)", flag="--config", value=config)
    for key, value in {**POSTPROCESSING, **(overrides or {})}.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    OmegaConf.resolve(cfg)
    return cfg


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelError("not a device name (auto, cpu, cuda, cuda:N, mps)", flag="--device", value=device) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("CUDA is not available on this machine", flag="--device", value=device)
    return dev


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
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, target)
    try:
        torch.hub.download_url_to_file(url, str(target) + ".part", progress=True)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise ModelError(f"download from {url} failed ({exc}); with no network, fetch that file elsewhere and "
                         f"pass its path", flag="--checkpoint", value=checkpoint) from None
    os.replace(str(target) + ".part", target)
    return target


def official_id(name: str) -> str | None:
    norm = name.removeprefix("facebook/").replace("-", "_").removesuffix(".pt")
    return norm if norm in OFFICIAL else None


def read_checkpoint(path: Path, flag: str = "--checkpoint") -> dict:
    """The whole SAM 2 checkpoint dict, `torch.load(weights_only=True)`; it must hold a `model` state dict.
    Zip-format files are memory-mapped, so a quantized checkpoint's extra entries cost no copy."""
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot be loaded with torch.load(weights_only=True): {first[:200]}", flag=flag, value=str(path)) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ModelError("not a SAM 2 checkpoint: expected a dict with a 'model' state dict", flag=flag, value=str(path))
    return ckpt


def read_state_dict(path: Path, flag: str = "--checkpoint") -> dict:
    """`torch.load(weights_only=True)` of a SAM 2 checkpoint -> its `model` state dict."""
    return read_checkpoint(path, flag)["model"]


def check_state_dict(model: torch.nn.Module, state: dict, flag: str, value: str) -> None:
    """Raise naming the keys that are missing, unexpected or of the wrong shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
             if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]

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

    def describe(self) -> dict:
        return {"config": str(self.config_path), "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None,
                "random_init": self.random_init, "device": str(self.device), "image_size": int(self.model.image_size),
                "parameters": sum(p.numel() for p in self.model.parameters())}


def build_model(config: str | None, checkpoint: str | None = None, *, random_init: bool = False,
                device: str = "auto", seed: int = 0, overrides: dict | None = None,
                adapt_state=None) -> LoadedModel:
    """Build a SAM 2 model in eval mode.

    config: package config name or YAML path (may be None when `checkpoint` is an official model id).
    checkpoint: `.pt` path or official model id. random_init: run on seeded random weights (explicit only).
    adapt_state(model, state) -> state: a chance to take entries that are not SAM 2 weights out of the state
    dict (a QAT trainer's quantizer parameters) once the model is built, before the state is checked.
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
    ckpt_path = resolve_checkpoint(checkpoint) if checkpoint is not None else None
    state = read_state_dict(ckpt_path) if ckpt_path is not None else None
    if state is not None:
        warn_nonfinite(state, str(checkpoint))

    from hydra.utils import instantiate

    torch.manual_seed(seed)
    try:
        model = instantiate(cfg.model, _recursive_=True)
    except Exception as exc:
        raise ModelError(f"the sam2 package cannot build this config: {str(exc).splitlines()[0][:300]}",
                         flag="--config", value=config) from None
    if getattr(model, "compile_image_encoder", False):
        raise ModelError("compile_image_encoder=True: torch.compile'd encoders run capture hooks badly; "
                         "set it to False", flag="--config", value=config)
    _check_image_size(model, "--image-size" if overrides and "model.image_size" in overrides else "--config")
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
                       random_init=state is None)


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors in a state dict that hold NaN or inf."""
    return [k for k, t in state.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def warn_nonfinite(state: dict, checkpoint: str) -> None:
    """A checkpoint with NaN/inf weights still runs (what it does is the finding); say so once, at load."""
    bad = nonfinite_tensors(state)
    if bad:
        log.warning("checkpoint %s holds non-finite values (NaN/inf) in %d tensors, first %s; running it anyway, "
                    "the summary's 'nonfinite' section says where they first reach the computation",
                    checkpoint, len(bad), bad[0])


def _check_image_size(model, flag: str) -> None:
    """Hiera needs the stride-4 grid to tile whole first-stage windows and every stage to halve evenly."""
    size = int(model.image_size)
    trunk = getattr(getattr(model, "image_encoder", None), "trunk", None)
    first = int(trunk.window_spec[0]) if trunk is not None and hasattr(trunk, "window_spec") else 1
    step = math.lcm(32, 4 * first)
    if size % step:
        raise ModelError(f"image_size must be a multiple of {step} for this Hiera (stride 32, first window "
                         f"{first} tokens of 4 px); e.g. {max(step, size // step * step)}", flag=flag, value=size)


def save_checkpoint(model: torch.nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Write `{"model": state_dict}` (SAM 2's own format), atomically."""
    from sam2_layerwise.store.atomic import atomic_torch_save

    return atomic_torch_save({"model": model.state_dict(), **(extra or {})}, Path(path))
