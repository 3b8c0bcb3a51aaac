"""The task model a preset builds: the base's body (+ peft) with a head of its own labels.

A preset names a method and its options (peft's config: ``peftkit.adapters.peft_configs``)::

    spec = load_preset("lora", overrides={"peft": {"r": 16}})
    model = build_task_model(base, spec, labels=["world", "sports", "business", "sci/tech"])
    model.task.labels                       # what it is for, as a transformers config says
    model.save_pretrained("adapters/agnews")
    model.release()                         # or `with model:`: the shared base back as it was

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
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.adapters import rewrite as residual
from peftkit.adapters.peft_configs import peft_config
from peftkit.adapters.task import TaskInfo, check_labels
from peftkit.config.presets import AdapterSpec, check_init, method_row
from peftkit.data.batching import position_limit
from peftkit.errors import ConfigError

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
    """Body (peft-wrapped, full or frozen) + pooling + one classification head, and the
    task it is for (``task``: labels, method, max length, template, base).

    It wraps the shared base until released: ``with model: ...`` or ``model.release()``
    takes its adapter back out (idempotent), so the base can train or serve the next one::

        with build_task_model(base, load_preset("lora"), labels=["neg", "pos"]) as model:
            ...  # train it
            model.save_pretrained("adapters/sst2")
        with TaskModel.from_pretrained(base, "adapters/sst2") as model:
            logits = model(input_ids, attention_mask)
    """

    def __init__(self, body: nn.Module, head: Head, pooling: str, task: TaskInfo | None = None):
        super().__init__()
        self.body = body
        self.head = head
        self.pooling = pooling
        # set when a PiSSA / OLoRA start rewrote the shared base (see peftkit.adapters.rewrite)
        self.base_rewrite: residual.BaseRewrite | None = None
        self.known_task = task  # what build_task_model / from_pretrained knew
        self.released = False  # release() took a peft adapter out of the base

    @property
    def task(self) -> TaskInfo:
        """The task this model is for, with what the model itself says (pooling, head size,
        cosine head, rewriting start) as it is now."""
        if self.known_task is None:
            raise ConfigError(
                "this TaskModel was built without its task (labels, method, max length): "
                "build it with build_task_model(base, spec, labels=[...]) or set model.task"
            )
        return self.describe(self.known_task)

    @task.setter
    def task(self, info: TaskInfo) -> None:
        self.known_task = info

    def describe(self, info: TaskInfo) -> TaskInfo:
        """``info`` with the fields the model decides: pooling, head size, cosine head and
        the rewriting start trained from."""
        start = info.start if self.base_rewrite is None else self.base_rewrite.start
        return dataclasses.replace(
            info,
            pooling=self.pooling,
            hidden_size=self.head.linear.in_features,
            head_normalize=bool(getattr(self.head, "normalize", False)),
            start=start,
        )

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

    # -- the adapter folder and the shared base ------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the adapter folder (peft files, head, ``task.json`` with the task and
        base) to ``folder``, replacing it whole; see :mod:`peftkit.adapters.folder`."""
        from peftkit.adapters.folder import save_adapter  # folder builds on this module

        return save_adapter(self, folder)

    @classmethod
    def from_pretrained(cls, base: Any, folder: str | Path) -> TaskModel:
        """The task model saved in ``folder``, on ``base`` (a peftkit Base, whose
        fingerprint must be the one the folder records, or a base model), in eval mode.
        It wraps the base until released, as a freshly built one does."""
        from peftkit.adapters.folder import load_task_model

        return load_task_model(base, folder)

    def release(self) -> Any:
        """Take this model's peft adapter back out of the shared base (after saving it),
        leaving the base as it was; again is a no-op. Returns the clean body."""
        body: Any = self.body
        if self.released or not (hasattr(body, "peft_config") and hasattr(body, "unload")):
            return body.get_base_model() if self.released else body
        try:
            clean = body.unload()
        except (AttributeError, ValueError):  # prompt learning injects nothing
            clean = body.get_base_model()
        if self.base_rewrite is not None:
            residual.restore(clean, self.base_rewrite)
            self.base_rewrite = None
        self.released = True
        return clean

    def __enter__(self) -> TaskModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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
    base_model: Any,
    spec: AdapterSpec,
    num_labels: int | None = None,
    *,
    labels: Sequence[str] | None = None,
    max_length: int | None = None,
    template: str | None = None,
    adapter_name: str = "default",
    seed: int = 0,
    verbalizer: dict[str, int] | None = None,
) -> TaskModel:
    """Wrap the base's body for ``spec`` and add a fresh head for ``labels`` (or
    ``num_labels``, named ``LABEL_0``...); the model knows its task (``model.task``).

    ``base_model`` is a peftkit Base (``load_base``: its fingerprint, source and
    quantization go into ``model.task`` and so into the saved folder) or a base model.
    ``max_length`` defaults to the base's positions (512 when it names none); ``template``
    is recorded for whoever serves the adapter. For ``full`` the body is deep-copied (the
    shared base stays frozen and untouched). ``verbalizer`` (label index order: label ->
    first token id of its word) starts the head from the causal LM's own output rows for
    those tokens, so before training the model scores label words exactly as the LM does
    (see :func:`verbalizer_token_ids`).

        model = build_task_model(load_base("minilm"), load_preset("lora"), labels=["neg", "pos"])
    """
    if labels is None and num_labels is not None and num_labels < 2:
        raise ConfigError(f"a classifier needs at least 2 labels, got {num_labels}")
    names = check_labels(labels, num_labels)
    if len(names) < 2:
        raise ConfigError(f"a classifier needs at least 2 labels, got {list(names)}")
    base_model, origin = unpack_base(base_model)
    torch.manual_seed(seed)
    shared = body_of(base_model)
    pooling = default_pooling(shared.config) if spec.pooling == "auto" else spec.pooling
    body, rewrite = _wrap_body(shared, spec, adapter_name)
    head = Head(hidden_size(shared.config), len(names), spec.head_dropout)
    if verbalizer is not None:
        _init_from_lm_head(head, base_model, list(verbalizer.values()))
    device = next(shared.parameters()).device
    info = TaskInfo(
        method=spec.method,
        labels=names,
        pooling=pooling,
        max_length=max_length or position_limit(shared.config) or 512,
        hidden_size=head.linear.in_features,
        template=template,
        **origin,
    )
    model = TaskModel(body, head.to(device), pooling, task=info)
    model.base_rewrite = rewrite
    return model


def unpack_base(base: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The base model, and what ``TaskInfo`` records of a peftkit Base (nothing for a bare
    model: its origin is unknown)."""
    if isinstance(base, nn.Module):
        return base, {}
    fingerprint = getattr(base, "fingerprint", None)
    if fingerprint is None:
        return base.model, {}
    return base.model, {
        "base_fingerprint": fingerprint.id,
        "base": fingerprint.to_dict(),
        "quantization": getattr(base, "quantization", None),
    }


def _wrap_body(
    body: nn.Module, spec: AdapterSpec, adapter_name: str
) -> tuple[nn.Module, residual.BaseRewrite | None]:
    """The trainable body for ``spec``: a float32 copy (``full``), the frozen base
    (``probe``) or the base wrapped by peft, with the rewrite a PiSSA / OLoRA start made."""
    kbit = bool(
        getattr(body, "is_loaded_in_4bit", False) or getattr(body, "is_loaded_in_8bit", False)
    )
    row = method_row(spec.method)
    if row.trains_body:
        if kbit:
            raise ConfigError(
                f"{spec.source}: method 'full' trains every weight, and k-bit weights cannot "
                "be trained; load the base unquantized or use lora / qlora"
            )
        # a float32 copy: AdamW's small updates would vanish in bfloat16 / float16 weights
        body = copy.deepcopy(body).float()
        for p in body.parameters():
            p.requires_grad_(True)
        return body, None
    if row.saved_as == "head":  # a probe: the head alone trains
        for p in body.parameters():
            p.requires_grad_(False)
        return body, None
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
            return residual.build(body, config, adapter_name)
        return peft.get_peft_model(body, config, adapter_name=adapter_name), None


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
