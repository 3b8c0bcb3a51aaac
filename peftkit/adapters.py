"""Adapter presets (YAML in ``adapters/``) and what they build: peft configs and task models.

A preset names a method and its options::

    spec = load_preset("lora", overrides={"peft": {"r": 16}})
    model = build_task_model(base, spec, num_labels=4)   # body (+ peft) + its own head

Every method trains the same kind of :class:`TaskModel`: the base's head-less body
(``AutoModel``; for a causal LM, the transformer under its LM head), wrapped by peft as a
``FEATURE_EXTRACTION`` model, then pooled (mean for encoders, last token for decoders) into
a classification head sized to the task's own labels. So adapters with 2, 4 and 77 labels
share one base, and an export loads in plain peft with ``AutoModel`` + ``PeftModel``.
``full`` trains a copy of every weight; ``probe`` trains the head alone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit import residual
from peftkit.errors import ConfigError, did_you_mean
from peftkit.paths import library_dir
from peftkit.schema import load_yaml, read_text

METHODS = ("lora", "qlora", "prefix", "prompt-tuning", "ia3", "full", "probe")
PEFT_METHODS = ("lora", "qlora", "prefix", "prompt-tuning", "ia3")
PRESET_KEYS = ("method", "peft", "head", "learning_rate", "quantization", "pooling")
# the peft config class each method builds, and the fields peftkit sets itself
PEFT_CONFIGS = {
    "lora": "LoraConfig",
    "qlora": "LoraConfig",
    "ia3": "IA3Config",
    "prefix": "PrefixTuningConfig",
    "prompt-tuning": "PromptTuningConfig",
}
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
    root = folder or library_dir("adapters")
    return sorted(p.stem for p in root.glob("*.yaml"))


def load_preset(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> AdapterSpec:
    """Load a built-in preset by name, or a user's YAML file by path, then apply overrides."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        candidate = library_dir("adapters") / f"{name_or_path}.yaml"
        if not candidate.is_file():
            names = available_presets()
            raise ConfigError(
                f"unknown adapter preset {str(name_or_path)!r}; built-in presets: "
                f"{', '.join(names)}, or give a path to a .yaml file"
                + did_you_mean(str(name_or_path), names)
            )
        path = candidate
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
        residual.check_init(peft_opts, quantized=quant is not None, where=source)
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
    drop = opts.get("lora_dropout", 0.0)
    if not (_is_number(drop) and 0 <= drop < 1):
        raise ConfigError(f"{source}: adapter.peft.lora_dropout must be in [0, 1), got {drop!r}")


def target_modules(body: nn.Module, method: str) -> tuple[list[str], list[str] | None]:
    """Target (and, for IA3, feed-forward) module names for this architecture, from peft's
    own per-architecture tables; raises with the model's Linear layers when unknown."""
    from peft.utils import constants as c

    model_type = getattr(body.config, "model_type", "")
    if method == "ia3":
        targets: Any = c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)
        ff: Any = c.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    else:
        targets = c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        ff = None
    if not targets:
        linear = sorted(
            {
                n.split(".")[-1]
                for n, m in body.named_modules()
                if isinstance(m, nn.Linear) or "Linear" in type(m).__name__
            }
        )
        raise ConfigError(
            f"no default target modules for architecture {model_type!r}; set "
            f"peft.target_modules to some of its linear layers: {linear}"
        )
    return list(targets), (list(ff) if ff else None)


def peft_config(spec: AdapterSpec, body: nn.Module) -> Any:
    """The ``peft`` config for ``spec`` on ``body`` (task type FEATURE_EXTRACTION)."""
    import peft

    opts = dict(spec.peft)
    task = peft.TaskType.FEATURE_EXTRACTION
    if spec.method in ("lora", "qlora", "ia3") and _has_conv1d(body):
        # GPT-2's layers are transformers' Conv1D (weights stored transposed); peft needs
        # fan_in_fan_out=True for them and, left False, warns and sets it on every build
        opts.setdefault("fan_in_fan_out", True)
    try:
        if spec.method in ("lora", "qlora"):
            if opts.get("target_modules", "auto") == "auto":
                opts["target_modules"], _ = target_modules(body, "lora")
            return peft.LoraConfig(task_type=task, **opts)
        if spec.method == "ia3":
            targets, ff = target_modules(body, "ia3")
            if opts.get("target_modules", "auto") == "auto":
                opts["target_modules"] = targets
            if opts.get("feedforward_modules", "auto") == "auto":
                opts["feedforward_modules"] = ff or []
            return peft.IA3Config(task_type=task, **opts)
        if spec.method == "prefix":
            return peft.PrefixTuningConfig(task_type=task, **opts)
        if spec.method == "prompt-tuning":
            return peft.PromptTuningConfig(task_type=task, **opts)
    except TypeError as exc:
        raise ConfigError(f"{spec.source}: bad peft option for {spec.method}: {exc}") from exc
    raise ConfigError(f"method {spec.method!r} has no peft config")


def _has_conv1d(body: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in body.modules())


# -- the task model -----------------------------------------------------------------------


def body_of(model: nn.Module) -> nn.Module:
    """The head-less transformer inside ``model`` (itself for an ``AutoModel``)."""
    inner = getattr(model, "base_model", model)
    return inner if inner is not None else model


def default_pooling(config: Any) -> str:
    from peftkit.base import infer_kind

    return "last" if infer_kind(config) == "causal-lm" else "mean"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool token states (B, T, H) into one vector per row, ignoring padding.

    Soft prompts make the output longer than the mask: the extra (virtual) positions come
    first and count as real tokens.
    """
    extra = hidden.shape[1] - attention_mask.shape[1]
    if extra > 0:
        ones = attention_mask.new_ones(attention_mask.shape[0], extra)
        attention_mask = torch.cat([ones, attention_mask], dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if how == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if how == "cls":
        return hidden[:, 0]
    # last real token (right padding); with left padding the last position is real anyway
    lengths = attention_mask.sum(1).long() - 1
    if bool((attention_mask[:, -1] == 1).all()):
        return hidden[:, -1]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths]


class Head(nn.Module):
    """Dropout + linear layer over a pooled vector.

    ``normalize=True`` makes it a cosine head: the pooled vector is L2-normalized first, so
    each logit is a (scaled) cosine to that label's weight row (few-shot prototypes).
    """

    def __init__(
        self, hidden_size: int, num_labels: int, dropout: float = 0.1, normalize: bool = False
    ):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_labels)
        self.normalize = normalize

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = self.dropout(pooled)
        if self.normalize:
            x = nn.functional.normalize(x, dim=-1)
        return self.linear(x)


class TaskModel(nn.Module):
    """Body (peft-wrapped, full or frozen) + pooling + one classification head."""

    def __init__(self, body: nn.Module, head: Head, pooling: str):
        super().__init__()
        self.body = body
        self.head = head
        self.pooling = pooling
        # set when a PiSSA / OLoRA start rewrote the shared base (see peftkit.residual)
        self.base_rewrite: residual.BaseRewrite | None = None

    def features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return pool(hidden, attention_mask, self.pooling)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooled: bool = False
    ) -> torch.Tensor:
        """Logits; with ``pooled=True`` the pooled features instead (through ``forward``, so
        a distributed wrapper sees the call: contrastive training)."""
        features = self.features(input_ids, attention_mask)
        if pooled:
            return features
        return self.head(features.to(self.head.linear.weight.dtype))


def hidden_size(config: Any) -> int:
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ConfigError(f"cannot tell the hidden size of {type(config).__name__}")


@contextlib.contextmanager
def peft_quiet() -> Iterator[None]:
    """Silence the FutureWarning that peft 0.21 triggers each time it wraps a model: it
    reads transformers 5's deprecated ``is_gradient_checkpointing``, which a user cannot act
    on. Other warnings pass; use it only where peft builds a ``PeftModel``."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning
        )
        yield


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Dropout off while scoring; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def build_task_model(
    base_model: nn.Module,
    spec: AdapterSpec,
    num_labels: int,
    *,
    adapter_name: str = "default",
    seed: int = 0,
    verbalizer: dict[str, int] | None = None,
) -> TaskModel:
    """Wrap ``base_model``'s body for ``spec`` and add a fresh head of ``num_labels``.

    For ``full`` the body is deep-copied (the shared base stays frozen and untouched).
    ``verbalizer`` (label index order: label -> first token id of its word) starts the
    head from the causal LM's own output rows for those tokens, so before training the
    model scores label words exactly as the LM does (see :func:`verbalizer_token_ids`).
    """
    if num_labels < 2:
        raise ConfigError(f"a classifier needs at least 2 labels, got {num_labels}")
    torch.manual_seed(seed)
    body = body_of(base_model)
    rewrite: residual.BaseRewrite | None = None
    pooling = default_pooling(body.config) if spec.pooling == "auto" else spec.pooling
    kbit = bool(
        getattr(body, "is_loaded_in_4bit", False) or getattr(body, "is_loaded_in_8bit", False)
    )
    if spec.method == "full":
        if kbit:
            raise ConfigError(
                f"{spec.source}: method 'full' trains every weight, and k-bit weights cannot "
                "be trained; load the base unquantized or use lora / qlora"
            )
        # a float32 copy: AdamW's small updates would vanish in bfloat16 / float16 weights
        body = copy.deepcopy(body).float()
        for p in body.parameters():
            p.requires_grad_(True)
    elif spec.method == "probe":
        for p in body.parameters():
            p.requires_grad_(False)
    else:
        import peft

        quantized = spec.method == "qlora" or kbit
        residual.check_init(spec.peft, quantized=quantized, where=spec.source)
        with peft_quiet():
            if quantized:
                # casts norms to fp32 and enables input grads; no gradient checkpointing on CPU
                body = peft.prepare_model_for_kbit_training(
                    body, use_gradient_checkpointing=torch.cuda.is_available()
                )
            config = peft_config(spec, body)
            if residual.rewrites_base(residual.init_of(spec.peft)):
                body, rewrite = residual.build(body, config, adapter_name)
            else:
                body = peft.get_peft_model(body, config, adapter_name=adapter_name)
    head = Head(hidden_size(body_of(base_model).config), num_labels, spec.head_dropout)
    if verbalizer is not None:
        _init_from_lm_head(head, base_model, list(verbalizer.values()))
    device = next(body_of(base_model).parameters()).device
    model = TaskModel(body, head.to(device), pooling)
    model.base_rewrite = rewrite
    return model


def verbalizer_token_ids(tokenizer: Any, words: dict[str, str]) -> dict[str, int]:
    """First token id of each label word (with its leading space, as the LM sees it).

    Raises :class:`ConfigError` when a word tokenizes to nothing or two labels share a
    first token (they could not be told apart).
    """
    ids: dict[str, int] = {}
    for label, word in words.items():
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ConfigError(f"verbalizer word {word!r} for label {label!r} tokenizes to nothing")
        ids[label] = int(tokens[0])
    seen: dict[int, str] = {}
    for label, tok in ids.items():
        if tok in seen:
            raise ConfigError(
                f"verbalizer words for {seen[tok]!r} and {label!r} start with the "
                f"same token ({tokenizer.decode([tok])!r}); choose words that differ "
                "in their first token"
            )
        seen[tok] = label
    return ids


def _init_from_lm_head(head: Head, base_model: Any, token_ids: list[int]) -> None:
    lm_head = (
        base_model.get_output_embeddings() if hasattr(base_model, "get_output_embeddings") else None
    )
    if lm_head is None or not hasattr(lm_head, "weight"):
        raise ConfigError(
            "a verbalizer head needs a causal LM base with its LM head: load the "
            "base with kind='causal-lm'"
        )
    with torch.no_grad():
        rows = lm_head.weight[token_ids].float()
        head.linear.weight.copy_(rows)
        bias = getattr(lm_head, "bias", None)
        if bias is not None:
            head.linear.bias.copy_(bias[token_ids].float())
        else:
            head.linear.bias.zero_()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
