"""What a causal model's forward takes, probed from its config and signature: the facts the
scoring strategies (``strategies.py``) are chosen by."""

from __future__ import annotations

import inspect

import torch
from peft import PeftType

from peftkit.prompting.scorers.common import has_lm_head


def takes_custom_masks(model) -> bool:
    """Whether the model's attention takes a 4-D mask as given (transformers' sdpa, eager)
    and its positions from ``position_ids`` (not ALiBi models such as Bloom and MPT, which
    place tokens by the mask and take no position ids)."""
    inner = unwrapped(model)
    if prompt_learning(model) is not None or not has_lm_head(inner):
        return False
    if not takes_position_ids(model):
        return False
    return getattr(getattr(inner, "config", None), "_attn_implementation", None) in (
        "sdpa",
        "eager",
    )


def takes_position_ids(model) -> bool:
    """Whether the model's forward places tokens by ``position_ids`` (not so ALiBi models
    such as Bloom and MPT, whose biases come from the mask or the token's index)."""
    return "position_ids" in forward_params(model)


def attention_window(model) -> int | None:
    """The shortest past any layer attends to (a sliding window, a chunk), or None when
    every layer sees the whole sequence; 0 for layers whose cache is not keys and values."""
    inner = unwrapped(model)
    config = inner.config.get_text_config(decoder=True)
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(config)
    except (ImportError, AttributeError, TypeError):  # another transformers: the plain fields
        sizes = [getattr(config, k, None) for k in ("sliding_window", "attention_chunk_size")]
        found = [int(v) for v in sizes if v is not None]
        return min(found) if found else None
    windows = [
        int(kw.get("sliding_window") or 0)
        for kind, kw in zip(types, kwargs, strict=True)
        if kind not in ("full_attention", "dummy")
    ]
    return min(windows) if windows else None


def prompt_learning(model):
    """The active peft config of a prompt-learning model (prefix / prompt tuning), else None."""
    config = getattr(model, "active_peft_config", None)
    return config if config is not None and config.is_prompt_learning else None


def prepends_virtual_tokens(model) -> bool:
    """True for a peft prompt-learning model that is not prefix tuning (prompt/p-tuning)."""
    config = prompt_learning(model)
    if config is None:
        return False
    cached = (PeftType.PREFIX_TUNING, getattr(PeftType, "CARTRIDGE", PeftType.PREFIX_TUNING))
    return config.peft_type not in cached


def dtype_of(model) -> torch.dtype:
    """The dtype the hidden states (and so the attention's queries) have."""
    return model.get_input_embeddings().weight.dtype


def cache_of(output):
    """The cache a forward returned (transformers 5.x names it ``cache``, earlier
    ``past_key_values``)."""
    return getattr(output, "cache", None) or output.past_key_values


def cache_kwarg(model) -> str:
    """The name the model's forward takes a cache by."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def unwrapped(model):
    """The transformers model inside a peft wrapper (the model itself when not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_params(model):
    """The parameters the (unwrapped) model's ``forward`` names."""
    return inspect.signature(type(unwrapped(model)).forward).parameters
