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
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from peftkit.adapters import rewrite as residual
from peftkit.config.presets import AdapterSpec, check_init
from peftkit.errors import ConfigError


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
    from peftkit.models.base import infer_kind

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
        # set when a PiSSA / OLoRA start rewrote the shared base (see peftkit.adapters.rewrite)
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
        check_init(spec.peft, quantized=quantized, where=spec.source)
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
