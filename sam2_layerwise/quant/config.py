"""The adaptive-QAT config: YAML -> `QuantConfig`, validated with errors that name the key.

Schema (docs/quantization.md has the full description and examples):

    format: sam2-layerwise/quant-config    # optional; if present it must be this
    version: 1                             # optional
    base_config: configs/sam2.1/sam2.1_hiera_b+.yaml   # optional SAM 2 config, used when --config is omitted
    defaults:                              # what every module gets before the rules (all float if omitted)
      weight:     {kind: uniform, bits: 8, symmetric: true, granularity: per_channel, calibration: minmax}
      activation: {kind: uniform, bits: 8, symmetric: false, granularity: per_tensor, calibration: percentile}
      attention:  {q: {bits: 8}, k: {bits: 8}, v: {bits: 8}, probs: {kind: log2, bits: 8}}
    rules:                                 # in order; for each field the last matching rule wins
      - match: "image_encoder.trunk.blocks.*.mlp.*"   # glob(s) over module names; ancestors match too
        weight: {bits: 4}                  # merged over what the module has so far
      - match: ["memory_attention", "memory_encoder"]
        float: true                        # every quantizer of these modules off
    checkpoint:                            # where learned parameters are in the checkpoint
      location: quantization               # this project's entry (default) or `model` (inside the state dict)
      key: "{module}.{role}_quantizer.{param}"   # location: model only
      params: {scale: scale, zero_point: zero_point, bits: bits}
      roles: {input: input}                # renames of roles in `key`
"""

from __future__ import annotations

import difflib
import string
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from sam2_layerwise._yaml import read_yaml
from sam2_layerwise.errors import ModelError
from sam2_layerwise.quant.quantizers import CALIBRATIONS, GRANULARITIES, SPEC_KINDS, QuantSpec

FORMAT = "sam2-layerwise/quant-config"
FLAG = "--adaptive-qat-config"
MAX_BYTES = 1 << 20  # a quantization config is a few hundred lines; 1 MiB is far beyond any real one

LAYER_ROLES = ("weight", "input")
ATTENTION_ROLES = ("q", "k", "v", "probs")
ROLES = LAYER_ROLES + ATTENTION_ROLES

SPEC_KEYS = tuple(f.name for f in fields(QuantSpec))
TOP_KEYS = ("format", "version", "name", "description", "base_config", "defaults", "rules", "checkpoint")
DEFAULT_KEYS = ("weight", "activation", "attention")
RULE_KEYS = ("match", "float", "weight", "activation", "attention", "note")
CKPT_KEYS = ("location", "key", "params", "roles")
CKPT_PARAMS = ("scale", "zero_point", "bits")

# Built-in starting points of each role, before the config's defaults and rules are merged over them.
ROLE_BASE = {
    "weight": QuantSpec(kind="uniform", bits=8, symmetric=True, granularity="per_channel", calibration="minmax"),
    "input": QuantSpec(kind="uniform", bits=8, symmetric=False, granularity="per_tensor", calibration="minmax"),
    "q": QuantSpec(kind="uniform", bits=8, symmetric=True, granularity="per_tensor", calibration="minmax"),
    "k": QuantSpec(kind="uniform", bits=8, symmetric=True, granularity="per_tensor", calibration="minmax"),
    "v": QuantSpec(kind="uniform", bits=8, symmetric=True, granularity="per_tensor", calibration="minmax"),
    "probs": QuantSpec(kind="log2", bits=8, symmetric=False, granularity="per_tensor", calibration="minmax"),
}
BITS_RANGE = {"uniform": (2, 16), "lsq": (2, 16), "log2": (2, 8)}


def _err(msg: str, source: str | None) -> ModelError:
    return ModelError(msg, flag=FLAG, value=source)


def _unknown(keys, known, where: str, source) -> None:
    for k in keys:
        if k not in known:
            close = difflib.get_close_matches(str(k), known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
            raise _err(f"{where}{'.' if where else ''}{k}: unknown key{hint}", source)


# A role's setting in a rule: None = not mentioned, False = float, dict = fields merged over the current spec.
RoleSetting = dict | bool | None


@dataclass(frozen=True)
class Rule:
    index: int
    patterns: tuple[str, ...]
    to_float: bool
    roles: dict  # role -> False or dict of spec fields

    @property
    def label(self) -> str:
        return f"rules[{self.index}]"


@dataclass(frozen=True)
class CheckpointLayout:
    """Where learned quantizer parameters are: this project's `quantization` entry, or keys of the model
    state dict built from `key` (with {module}, {role}, {param})."""

    location: str = "quantization"
    key: str = "{module}.{role}_quantizer.{param}"
    params: dict = field(default_factory=lambda: {p: p for p in CKPT_PARAMS})
    roles: dict = field(default_factory=dict)

    def state_key(self, module: str, role: str, param: str) -> str:
        return self.key.format(module=module, role=self.roles.get(role, role), param=self.params[param])

    def to_dict(self) -> dict:
        return {"location": self.location, "key": self.key, "params": dict(self.params), "roles": dict(self.roles)}


@dataclass(frozen=True)
class QuantConfig:
    """A validated adaptive-QAT config. `defaults` maps each role to a spec or None (float)."""

    source: str | None
    base_config: str | None
    defaults: dict
    rules: tuple[Rule, ...]
    checkpoint: CheckpointLayout
    raw: dict

    def to_dict(self) -> dict:
        return self.raw


def _spec(value, where: str, base: QuantSpec, source, role: str) -> QuantSpec | None:
    """Validate one quantizer mapping (or false/null = float) and merge it over `base`."""
    if value is None or value is False:
        return None
    if value is True:
        return base
    if not isinstance(value, dict):
        raise _err(f"{where}: expected a mapping of quantizer fields or false, got {type(value).__name__}", source)
    _unknown(value, SPEC_KEYS, where, source)
    merged = replace(base, **value)
    check_spec(merged, where, source, role, given=value)
    return merged


def check_spec(spec: QuantSpec, where: str, source, role: str, given: dict | None = None) -> None:
    given = given or {}

    def at(key):
        return f"{where}.{key}"

    if spec.kind not in SPEC_KINDS:
        raise _err(f"{at('kind')}: '{spec.kind}' is not a quantizer kind ({', '.join(SPEC_KINDS)})", source)
    if spec.kind == "log2" and role != "probs":
        raise _err(f"{at('kind')}: log2 is for attention probabilities (attention.probs) only", source)
    if role == "probs" and spec.kind not in ("log2", "uniform"):
        raise _err(f"{at('kind')}: attention probabilities take log2 or uniform (fixed [0, 1] range), not "
                   f"'{spec.kind}'", source)
    if isinstance(spec.bits, bool) or not (isinstance(spec.bits, int) or spec.bits == "checkpoint"):
        raise _err(f"{at('bits')}: '{spec.bits}' is not a whole number of bits (or 'checkpoint')", source)
    if spec.bits == "checkpoint" and (role == "probs"):
        raise _err(f"{at('bits')}: attention probabilities have no learned bits; give a number", source)
    if isinstance(spec.bits, int):
        lo, hi = BITS_RANGE[spec.kind]
        if not lo <= spec.bits <= hi:
            raise _err(f"{at('bits')}: {spec.bits} is out of range for {spec.kind} ({lo}..{hi})", source)
    for key in ("symmetric", "enabled"):
        if not isinstance(getattr(spec, key), bool):
            raise _err(f"{at(key)}: expected true or false, got '{getattr(spec, key)}'", source)
    if spec.granularity not in GRANULARITIES:
        raise _err(f"{at('granularity')}: '{spec.granularity}' is not one of {', '.join(GRANULARITIES)}", source)
    if spec.axis is not None and (isinstance(spec.axis, bool) or not isinstance(spec.axis, int)):
        raise _err(f"{at('axis')}: expected a whole number (a tensor dimension), got '{spec.axis}'", source)
    if spec.axis is not None and role != "weight":
        raise _err(f"{at('axis')}: only weights take an axis; activations are per channel along their feature "
                   f"dimension and q/k/v per head", source)
    if spec.calibration not in CALIBRATIONS:
        raise _err(f"{at('calibration')}: '{spec.calibration}' is not one of {', '.join(CALIBRATIONS)}", source)
    if isinstance(spec.percentile, bool) or not isinstance(spec.percentile, (int, float)) or not 50 < spec.percentile <= 100:
        raise _err(f"{at('percentile')}: {spec.percentile} must be a number in (50, 100]", source)
    if role == "probs" and ("granularity" in given and spec.granularity != "per_tensor"):
        raise _err(f"{at('granularity')}: attention probabilities are quantized per tensor", source)


def _role_block(value, where: str, source, kind: str) -> dict:
    """A rule's or the defaults' `attention` mapping -> {role: setting}; `weight`/`activation` -> one role."""
    if kind == "attention":
        if value is None or value is False:
            return {r: False for r in ATTENTION_ROLES}
        if not isinstance(value, dict):
            raise _err(f"{where}: expected a mapping with q, k, v, probs (or false), got {type(value).__name__}", source)
        _unknown(value, ATTENTION_ROLES, where, source)
        return {r: value[r] for r in ATTENTION_ROLES if r in value}
    return {"weight" if kind == "weight" else "input": value}


def _check_setting(value, where, source, role) -> RoleSetting:
    """Validate a rule's role setting without knowing the spec it will be merged over."""
    if value is None or value is False:
        return False
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise _err(f"{where}: expected a mapping of quantizer fields or false, got {type(value).__name__}", source)
    _unknown(value, SPEC_KEYS, where, source)
    # Check field values now (merged over the role's base) so a typo fails before the model is built.
    check_spec(replace(ROLE_BASE[role], **value), where, source, role, given=value)
    return dict(value)


def parse_config(raw, source: str | None = None) -> QuantConfig:
    """Validate a parsed YAML mapping. Errors name the key path (`rules[2].weight.bits: ...`)."""
    if raw is None:
        raise _err("is empty; expected a mapping with defaults/rules (see docs/quantization.md)", source)
    if not isinstance(raw, dict):
        raise _err(f"expected a YAML mapping at the top level, got {type(raw).__name__}", source)
    _unknown(raw, TOP_KEYS, "", source)
    if "format" in raw and raw["format"] != FORMAT:
        raise _err(f"format: '{raw['format']}' is not '{FORMAT}'", source)
    if "version" in raw and raw["version"] != 1:
        raise _err(f"version: {raw['version']} is not supported (this tool reads version 1)", source)
    base_config = raw.get("base_config")
    if base_config is not None and not isinstance(base_config, str):
        raise _err("base_config: expected a SAM 2 config name or YAML path", source)

    defaults_raw = raw.get("defaults") or {}
    if not isinstance(defaults_raw, dict):
        raise _err("defaults: expected a mapping with weight, activation, attention", source)
    _unknown(defaults_raw, DEFAULT_KEYS, "defaults", source)
    defaults: dict = {r: None for r in ROLES}
    for kind in DEFAULT_KEYS:
        if kind not in defaults_raw:
            continue
        for role, value in _role_block(defaults_raw[kind], f"defaults.{kind}", source, kind).items():
            where = f"defaults.{kind}" + (f".{role}" if kind == "attention" else "")
            spec = _spec(value, where, ROLE_BASE[role], source, role)
            defaults[role] = spec

    rules_raw = raw.get("rules") or []
    if not isinstance(rules_raw, list):
        raise _err("rules: expected a list of rules", source)
    rules = []
    for i, r in enumerate(rules_raw):
        where = f"rules[{i}]"
        if not isinstance(r, dict):
            raise _err(f"{where}: expected a mapping with 'match'", source)
        _unknown(r, RULE_KEYS, where, source)
        if "match" not in r:
            raise _err(f"{where}.match: missing (a module-name glob or a list of them)", source)
        pats = r["match"] if isinstance(r["match"], list) else [r["match"]]
        if not pats or not all(isinstance(p, str) and p for p in pats):
            raise _err(f"{where}.match: expected a non-empty glob or list of globs", source)
        to_float = r.get("float", False)
        if not isinstance(to_float, bool):
            raise _err(f"{where}.float: expected true or false", source)
        roles = {}
        for kind in ("weight", "activation", "attention"):
            if kind in r:
                for role, value in _role_block(r[kind], f"{where}.{kind}", source, kind).items():
                    w = f"{where}.{kind}" + (f".{role}" if kind == "attention" else "")
                    roles[role] = _check_setting(value, w, source, role)
        if not to_float and not roles:
            raise _err(f"{where}: sets nothing (give float: true, weight, activation or attention)", source)
        rules.append(Rule(index=i, patterns=tuple(pats), to_float=to_float, roles=roles))

    ck = raw.get("checkpoint") or {}
    if not isinstance(ck, dict):
        raise _err("checkpoint: expected a mapping (location, key, params, roles)", source)
    _unknown(ck, CKPT_KEYS, "checkpoint", source)
    layout = CheckpointLayout()
    if "location" in ck:
        if ck["location"] not in ("quantization", "model"):
            raise _err(f"checkpoint.location: '{ck['location']}' is not 'quantization' or 'model'", source)
        layout = replace(layout, location=ck["location"])
    if "key" in ck:
        layout = replace(layout, key=_key_template(ck["key"], source))
    if "params" in ck:
        if not isinstance(ck["params"], dict):
            raise _err("checkpoint.params: expected a mapping like {scale: step_size}", source)
        _unknown(ck["params"], CKPT_PARAMS, "checkpoint.params", source)
        layout = replace(layout, params={**layout.params, **{k: str(v) for k, v in ck["params"].items()}})
        names = list(layout.params.values())
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            which = [k for k, v in layout.params.items() if v == dup[0]]
            raise _err(f"checkpoint.params: {' and '.join(which)} both map to '{dup[0]}'; give each its own name",
                       source)
    if "roles" in ck:
        if not isinstance(ck["roles"], dict):
            raise _err("checkpoint.roles: expected a mapping like {input: act}", source)
        _unknown(ck["roles"], ROLES, "checkpoint.roles", source)
        layout = replace(layout, roles={k: str(v) for k, v in ck["roles"].items()})
    return QuantConfig(source=source, base_config=base_config, defaults=defaults, rules=tuple(rules),
                       checkpoint=layout, raw=_plain(raw))


KEY_FIELDS = ("module", "role", "param")


def _key_template(key, source) -> str:
    """`checkpoint.key`: literal text and the plain fields {module}, {role}, {param}, each at least once. No
    attribute or index access ({role.__class__}, {module[0]}), positional fields ({0}), conversions ({param!r})
    or format specs ({module:>9}): a template is a key pattern, not code."""
    want = "checkpoint.key: expected a template containing {module}, {role} and {param}"
    if not isinstance(key, str):
        raise _err(f"{want}, got {type(key).__name__}", source)
    try:
        parts = list(string.Formatter().parse(key))
    except ValueError as exc:
        raise _err(f"{want}; '{key}' is not a valid template ({exc})", source) from None
    used = set()
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in KEY_FIELDS or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise _err(f"{want}; '{key}' uses {shown}, and only those plain fields are allowed (no attribute or "
                       f"index access, conversion or format spec)", source)
        used.add(name)
    if used != set(KEY_FIELDS):
        missing = ", ".join("{" + n + "}" for n in KEY_FIELDS if n not in used)
        raise _err(f"{want}; '{key}' lacks {missing}", source)
    return key


def _plain(obj):
    """YAML values as plain dict/list/str/number/bool/None (safe for a weights_only checkpoint)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def load_quant_config(path: str | Path) -> QuantConfig:
    """Read and validate a quantization config file (flag `--adaptive-qat-config`): at most MAX_BYTES, read by
    a SafeLoader that refuses alias bombs, deep nesting and duplicate keys."""
    p = Path(path).expanduser()
    if not p.exists():
        raise _err("no such file", str(path))
    if not p.is_file():
        raise _err("not a file", str(path))
    _, raw = read_yaml(p, flag=FLAG, value=str(path), error=ModelError, max_bytes=MAX_BYTES)
    return parse_config(raw, str(path))
