"""Load SAM 2 from config + checkpoint; run its real predictors."""

from sam2_layerwise.model.loading import LoadedModel, build_model, pick_device, resolve_config, save_checkpoint

__all__ = ["LoadedModel", "build_model", "pick_device", "resolve_config", "save_checkpoint"]
