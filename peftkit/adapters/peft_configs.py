"""The ``peft`` config a preset asks for, on a given body: the method's config class with
the preset's options, target modules from peft's own per-architecture tables when the
preset says ``auto``, and GPT-2's transposed layers flagged."""

from __future__ import annotations

from typing import Any

from torch import nn

from peftkit.config.presets import AdapterSpec
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
