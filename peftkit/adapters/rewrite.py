"""LoRA starts that rewrite the base: PiSSA and OLoRA.

peft's ``init_lora_weights="pissa"`` (or ``"pissa_niter_N"``, ``"olora"``) starts A and B from
each target weight's principal directions and leaves the base holding the residual
``W - s·B0·A0``. That is a better start for training, but the shared base is no longer the
base, and the trained A, B are only right on top of that residual. peftkit therefore

1. keeps a copy of every weight the start rewrites (:func:`build`), and puts them back when
   the adapter is released, so the next adapter trains or serves on the untouched base;
2. saves the adapter converted to plain LoRA of rank 2r on the original weights, with peft's
   own conversion (``save_pretrained(path_initial_model_for_weight_conversion=...)``:
   ``ΔW = s·(B·A − B0·A0) = s·[B | −B0]·[A ; A0]``), so the registry, hot-swap, mixed
   batches and plain ``PeftModel.from_pretrained`` see an ordinary LoRA adapter.

The copy costs the rewritten weights' memory once more while training (with
``target_modules: all-linear``, about the body's size).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.config.presets import REWRITING, check_init, init_of, rewrites_base  # noqa: F401
from peftkit.errors import ConfigError


def refuse_unrecorded(body: Any) -> None:
    """A peft model built outside ``build_task_model`` with a PiSSA / OLoRA / CorDA start:
    its base holds a residual, so its adapter is only right on that rewritten base and,
    saved as it is, would load onto the unchanged base and predict wrongly."""
    for name, config in (getattr(body, "peft_config", None) or {}).items():
        init = init_of(vars(config))
        if init is not None and init.startswith((*REWRITING, "corda")):
            raise ConfigError(
                f"adapter {name!r}: init_lora_weights={init!r} rewrote the base model's weights "
                "and peftkit has no record of the originals to convert it back (build it with "
                "peftkit.adapters.model.build_task_model), so it is not saved"
            )


@dataclass
class BaseRewrite:
    """What it takes to undo a rewriting start: the original weights, by module name in
    the (unwrapped) body, and the adapter's initial A0, B0 in peft's saved-key form."""

    adapter_name: str
    originals: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]
    start: str  # the init_lora_weights value, e.g. "pissa"


def build(body: nn.Module, config: Any, adapter_name: str) -> tuple[Any, BaseRewrite]:
    """``peft.get_peft_model`` with a rewriting start, remembering how to undo it."""
    import peft
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    before = {
        name: module.weight.detach().clone()
        for name, module in body.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 2
        and not isinstance(module, nn.Embedding)
    }
    wrapped = peft.get_peft_model(body, config, adapter_name=adapter_name)
    inner = wrapped.base_model.model  # the body, its targets now LoRA layers
    originals = {}
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer) and name in before:
            originals[name] = before[name]
    before.clear()
    initial = {
        k: v.detach().clone()
        for k, v in get_peft_model_state_dict(wrapped, adapter_name=adapter_name).items()
    }
    start = str(config.init_lora_weights)
    return wrapped, BaseRewrite(adapter_name, originals, initial, start)


def restore(body: nn.Module, rewrite: BaseRewrite) -> None:
    """Put the original weights back into an unwrapped body (after peft's ``unload``)."""
    with torch.no_grad():
        for name, weight in rewrite.originals.items():
            module: Any = body.get_submodule(name)
            module.weight.data = weight.to(module.weight.device)


def save_as_lora(wrapped: Any, folder: Path, rewrite: BaseRewrite) -> None:
    """Save ``wrapped``'s trained adapter to ``folder`` as plain LoRA of rank 2r on the
    original weights (peft's conversion; the wrapped model itself is left as it was)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="peftkit-init-") as tmp:
        # peft writes the initial adapter's config here itself (as a default start) and loads
        # it back under the folder's name as a second adapter, which it then deletes
        initial = Path(tmp) / "initial"
        initial.mkdir()
        save_file(
            {k: v.contiguous() for k, v in rewrite.initial.items()},
            str(initial / "adapter_model.safetensors"),
        )
        with warnings.catch_warnings():
            # loading the initial adapter beside the trained one makes peft advise the very
            # conversion it is doing ("... changes the base weights ... Consider converting")
            warnings.filterwarnings("ignore", message=".*changes the base weights of the model")
            wrapped.save_pretrained(
                str(folder),
                selected_adapters=[rewrite.adapter_name],
                path_initial_model_for_weight_conversion=str(initial),
            )
