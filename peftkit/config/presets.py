"""Adapter presets: a YAML file in ``adapters/`` (or a user's path) read into a validated
:class:`AdapterSpec`, and the table of the methods a preset may name.

    spec = load_preset("lora", {"peft": {"r": 16}})
    spec.method, spec.peft, spec.learning_rate          # ('lora', {'target_modules': ..., 'r': 16}, 0.003)

Every check that needs no model runs here: unknown keys (with the closest valid one), the
method, peft's own option names and the ranges peft checks only once it wraps a model, and
starts (``init_lora_weights``) peftkit cannot run. No torch import: peft is imported only
to check peft options, inside :func:`check_peft_options`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.config.library import available, find
from peftkit.config.schema import load_yaml, read_text
from peftkit.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Method:
    """What peftkit does with one adapter method (one row of :data:`METHOD_TABLE`)."""

    peft_config: str | None  # the peft config class it builds (None: no peft adapter)
    trains_body: bool  # whether the body's own weights train (full fine-tuning)
    stacks: bool  # whether rows of it join a rank-stacked mixed batch (serving.mixed)
    prompt: bool  # virtual tokens in front of the input (prefix, prompt tuning)
    saved_as: str  # "peft" (adapter_config + weights), "head" (head only), "model" (whole body)
    family: str  # adapters of one family share a peft model when served (lora and qlora)


METHOD_TABLE: dict[str, Method] = {
    "lora": Method("LoraConfig", False, True, False, "peft", "lora"),
    "qlora": Method("LoraConfig", False, True, False, "peft", "lora"),
    "prefix": Method("PrefixTuningConfig", False, False, True, "peft", "prefix"),
    "prompt-tuning": Method("PromptTuningConfig", False, False, True, "peft", "prompt-tuning"),
    "ia3": Method("IA3Config", False, False, False, "peft", "ia3"),
    "full": Method(None, True, False, False, "model", "full"),
    "probe": Method(None, False, True, False, "head", "probe"),
}


def method_row(method: str) -> Method:
    """The table's row for ``method``; a ConfigError names the valid ones."""
    try:
        return METHOD_TABLE[method]
    except KeyError:
        raise ConfigError(
            f"method {method!r} is not one of {', '.join(METHOD_TABLE)}"
            + did_you_mean(str(method), METHOD_TABLE)
        ) from None


METHODS = tuple(METHOD_TABLE)
PEFT_METHODS = tuple(m for m, row in METHOD_TABLE.items() if row.peft_config is not None)
PRESET_KEYS = ("method", "peft", "head", "learning_rate", "quantization", "pooling")
# the peft config class each method builds, and the fields peftkit sets itself
PEFT_CONFIGS = {m: row.peft_config for m, row in METHOD_TABLE.items() if row.peft_config}
SET_BY_PEFTKIT = (
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
)


@dataclass(frozen=True)
class AdapterSpec:
    """A validated adapter preset."""

    method: str
    peft: dict[str, Any] = field(default_factory=dict)
    head_dropout: float = 0.1
    learning_rate: float = 1e-3
    quantization: str | None = None  # qlora: "4bit" (default) or "8bit"
    pooling: str = "auto"  # auto | mean | last | cls
    source: str = "<dict>"

    def __post_init__(self) -> None:
        lr = self.learning_rate
        if not (_is_number(lr) and math.isfinite(lr) and lr > 0):
            raise ConfigError(
                f"{self.source}: adapter.learning_rate must be a finite number > 0, got {lr!r}"
            )
        drop = self.head_dropout
        if not (_is_number(drop) and 0 <= drop < 1):
            raise ConfigError(
                f"{self.source}: adapter.head.dropout must be in [0, 1), got {drop!r}"
            )

    @property
    def uses_peft(self) -> bool:
        return self.method in PEFT_METHODS


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def available_presets(folder: Path | None = None) -> list[str]:
    return available("adapters", folder)


def load_preset(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> AdapterSpec:
    """Load a built-in preset by name, or a user's YAML file by path, then apply overrides."""
    path = find("adapters", name_or_path)
    data = load_yaml(read_text(path, "adapter preset"), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an adapter preset must be a mapping with a 'method' key")
    return spec_from_dict(_merge(data, overrides or {}), source=str(path))


def spec_from_dict(data: dict[str, Any], source: str = "<dict>") -> AdapterSpec:
    for key in data:
        if key not in PRESET_KEYS:
            raise ConfigError(
                f"{source}: unknown key {key!r} in adapter preset"
                + did_you_mean(key, PRESET_KEYS)
                + f"; valid keys: {', '.join(PRESET_KEYS)}"
            )
    method = data.get("method")
    if method not in METHODS:
        raise ConfigError(
            f"{source}: method={method!r} is not one of {', '.join(METHODS)}"
            + did_you_mean(str(method), METHODS)
        )
    peft_opts = dict(data.get("peft") or {})
    if peft_opts and method in ("full", "probe"):
        raise ConfigError(f"{source}: method {method!r} takes no 'peft' options")
    head = data.get("head") or {}
    if not isinstance(head, dict) or set(head) - {"dropout"}:
        raise ConfigError(f"{source}: 'head' takes only 'dropout'")
    quant = data.get("quantization")
    if method == "qlora":
        quant = quant or "4bit"
    if quant not in (None, "4bit", "8bit"):
        raise ConfigError(f"{source}: quantization={quant!r}; use '4bit' or '8bit'")
    if method in ("lora", "qlora"):
        check_init(peft_opts, quantized=quant is not None, where=source)
    if method in PEFT_CONFIGS:
        check_peft_options(method, peft_opts, source)
    pooling = data.get("pooling", "auto")
    if pooling not in ("auto", "mean", "last", "cls"):
        raise ConfigError(f"{source}: pooling={pooling!r}; use auto, mean, last or cls")
    lr, dropout = data.get("learning_rate", 1e-3), head.get("dropout", 0.1)
    if not (_is_number(lr) and _is_number(dropout)):
        raise ConfigError(
            f"{source}: adapter.learning_rate and adapter.head.dropout must be numbers, got "
            f"{lr!r} and {dropout!r}"
        )
    return AdapterSpec(
        method=method,
        peft=peft_opts,
        head_dropout=dropout,
        learning_rate=lr,
        quantization=quant,
        pooling=pooling,
        source=source,
    )


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# -- peft configs -------------------------------------------------------------------------


def check_peft_options(method: str, opts: dict[str, Any], source: str) -> None:
    """Refuse ``adapter.peft`` options peft would refuse, or fail on only once it wraps a
    model: the names against the config class's fields, a few ranges peft checks late,
    then the config object itself, built without a model (``auto`` targets left out)."""
    import peft

    cls = getattr(peft, PEFT_CONFIGS[method])
    valid = [f.name for f in dataclasses.fields(cls) if f.name not in SET_BY_PEFTKIT]
    for key in opts:
        if key not in valid:
            alias = COMMON_NAMES.get(str(key))
            raise ConfigError(
                f"{source}: adapter.peft.{key} is not a {method} option"
                + (
                    f" (did you mean {alias!r}?)"
                    if alias in valid
                    else did_you_mean(str(key), valid)
                )
                + f"; valid keys: {', '.join(valid)}"
            )
    _check_ranges(opts, source)
    trial = {k: v for k, v in opts.items() if not (k.endswith("_modules") and v == "auto")}
    error = _build_error(cls, trial)
    if error is not None:
        # name the option that fails on its own, where one does
        culprit = next((k for k in trial if _build_error(cls, {k: trial[k]})), None)
        where = f"adapter.peft.{culprit}={trial[culprit]!r}" if culprit else "adapter.peft"
        raise ConfigError(f"{source}: {where} is refused by peft's {cls.__name__}: {error}")


def _build_error(cls: Any, opts: dict[str, Any]) -> str | None:
    """Why peft will not build ``cls`` from ``opts`` (None: it builds)."""
    import peft

    try:
        with warnings.catch_warnings():  # the real build warns again, with the model
            warnings.simplefilter("ignore")
            cls(task_type=peft.TaskType.FEATURE_EXTRACTION, **opts)
    except (TypeError, ValueError) as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


# names users reach for that peft spells otherwise (too far apart for difflib)
COMMON_NAMES = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
# peft accepts these when the config is made and fails (or trains nothing) only on a model
_POSITIVE_INTS = ("r", "num_virtual_tokens")
LORA_BIAS = ("none", "all", "lora_only")


def _check_ranges(opts: dict[str, Any], source: str) -> None:
    for key in _POSITIVE_INTS:
        value = opts.get(key)
        if key in opts and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(
                f"{source}: adapter.peft.{key} must be a whole number >= 1, got {value!r}"
            )
        if key in opts and isinstance(value, int) and value < 1:
            raise ConfigError(f"{source}: adapter.peft.{key} must be >= 1, got {value}")
    alpha = opts.get("lora_alpha", 1)
    if not (_is_number(alpha) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"{source}: adapter.peft.lora_alpha must be a number > 0, got {alpha!r}")
    if opts.get("bias", "none") not in LORA_BIAS:
        raise ConfigError(
            f"{source}: adapter.peft.bias must be one of {', '.join(LORA_BIAS)}, got "
            f"{opts['bias']!r}"
        )
    targets = opts.get("target_modules")
    if targets is not None and targets != "auto":
        names = [targets] if isinstance(targets, str) else targets
        if (
            not isinstance(targets, (str, list, tuple))
            or not names
            or not all(isinstance(t, str) and t.strip() for t in names)
        ):
            raise ConfigError(
                f"{source}: adapter.peft.target_modules must be a non-empty list of module "
                f"names (e.g. [query, value]), a name pattern, or 'all-linear'; got {targets!r}"
            )
    drop = opts.get("lora_dropout", 0.0)
    if not (_is_number(drop) and 0 <= drop < 1):
        raise ConfigError(f"{source}: adapter.peft.lora_dropout must be in [0, 1), got {drop!r}")


# -- starts (init_lora_weights) ---------------------------------------------------------

# starts that rewrite the base weights and that peftkit converts back to plain LoRA
REWRITING = ("pissa", "olora")
# starts peftkit cannot run: they need peft's data-driven preprocessing first
# (``preprocess_corda``, ``preprocess_loraga``, ``initialize_lora_eva_weights``) or replace
# the shared base's weights by quantized ones (``loftq``)
UNSUPPORTED = ("corda", "lora_ga", "eva", "loftq")


def init_of(opts: dict[str, Any]) -> str | None:
    """The named start in peft options (``init_lora_weights``), lower case; None for the
    default (``True``) or a bool."""
    init = opts.get("init_lora_weights", True)
    return init.lower() if isinstance(init, str) else None


def rewrites_base(init: str | None) -> bool:
    return bool(init) and init.startswith(REWRITING)  # type: ignore[union-attr]


def check_init(opts: dict[str, Any], *, quantized: bool, where: str) -> None:
    """Refuse, before any training, a start peftkit cannot run or convert."""
    init = init_of(opts)
    if init is None:
        return
    if init.startswith(UNSUPPORTED):
        raise ConfigError(
            f"{where}: init_lora_weights={init!r} is not supported by peftkit (it needs peft's "
            "data-driven preprocessing or rewrites the shared base with quantized weights); "
            "use the default, 'gaussian', 'pissa', 'pissa_niter_4' or 'olora'"
        )
    if rewrites_base(init) and quantized:
        raise ConfigError(
            f"{where}: init_lora_weights={init!r} rewrites the base weights it adapts, which "
            "peftkit cannot do on a shared quantized base (the adapter would only be right on "
            "the re-quantized residual); use it on a full-precision base, or the default start"
        )
