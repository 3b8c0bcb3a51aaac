"""Continue a trained adapter (``adapter.init_from``): the new task model starts from a
parent adapter folder's weights and head, so training picks up where the parent stopped.

    model = build_task_model(base, spec, labels=("negative", "positive", "neutral"))
    continue_from(model, "registry/adapters/sst2/1")   # peft weights and head rows copied

The parent must be the same method on the same base, with the same peft shape (rank,
target modules); the new labels must include every parent label. Head rows are matched by
label name: a parent label's row is the parent's, bitwise; a new label keeps the fresh row
the model was built with. :func:`label_order` gives the order that keeps the parent's rows
first (what a recipe trains with).

With ``adapter.keep_parent`` a recipe blends the parent's weights back in after training,
a weight-space ensemble of parent and child (WiSE-FT, Wortsman et al. 2022)::

    start = ParentWeights(model, continue_from(model, folder))   # a copy, before training
    ...train...
    start.blend_into(model, keep=0.5)   # each trained tensor: 0.5 x trained + 0.5 x parent

Both share the parent's starting point, so averaging the LoRA factors (not only their
product) stays between the two models. The head rows of labels the parent lacked stay as
trained. ``bench/bench_continual.py --keep-parent`` measures it across four sentiment
domains (bench/README.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from peftkit.adapters.folder import read_task
from peftkit.adapters.model import TaskModel
from peftkit.config.presets import method_row
from peftkit.config.recipe_checks import check_keep_parent
from peftkit.errors import ConfigError, FingerprintMismatch, IntegrityError
from peftkit.registry.entries import describe_base

__all__ = ["ParentWeights", "check_parent", "continue_from", "label_order"]

# adapter_config.json fields that decide the shape of the saved weights
SHAPE_FIELDS = ("peft_type", "r", "target_modules", "num_virtual_tokens", "feedforward_modules")


def label_order(parent: Sequence[str], labels: Sequence[str]) -> tuple[str, ...]:
    """The parent's labels, then the new data's other labels in their own order."""
    return tuple(parent) + tuple(x for x in labels if x not in parent)


def check_parent(
    parent: str, method: str, labels: Sequence[str], *, task_method: str,
    task_labels: Sequence[str], where: str,
) -> tuple[str, ...]:  # fmt: skip
    """Refuse a parent of another method, or whose labels the new data lacks (naming
    them); returns :func:`label_order`. ``where`` starts the message."""
    if method != task_method:
        raise ConfigError(
            f"{where}: {parent} is a {method} adapter but this task trains {task_method}; "
            f"init_from continues the same method (set adapter.preset: {method})"
        )
    missing = [x for x in labels if x not in task_labels]
    if missing:
        raise ConfigError(
            f"{where}: the data lacks {parent}'s labels {missing} (the data has "
            f"{list(task_labels)}); continuing needs every parent label, and may add new ones"
        )
    return label_order(labels, task_labels)


class ParentWeights:
    """A copy of a continued model's trainable tensors as ``continue_from`` left them (the
    parent's weights), by parameter name, and which head rows (``head_rows``, as
    ``continue_from`` returns them) are the parent's."""

    def __init__(self, model: TaskModel, head_rows: Sequence[int]) -> None:
        self.tensors = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }
        self.head_rows = list(head_rows)

    @torch.no_grad()
    def blend_into(self, model: TaskModel, keep: float) -> None:
        """Make each trainable tensor of ``model`` ``(1 - keep) * trained + keep * parent``;
        in the head, only the rows of the parent's labels (a new label's row stays as
        trained). ``keep`` in [0, 1); 0 changes nothing."""
        if check_keep_parent(keep) == 0:
            return
        params = dict(model.named_parameters())
        missing = sorted(set(self.tensors) - set(params))
        if missing:
            raise ConfigError(f"adapter.keep_parent: the trained model lacks {missing[:3]}")
        head = {id(model.head.linear.weight), id(model.head.linear.bias)}
        for name, start in self.tensors.items():
            param, start = params[name], start.to(params[name].device)
            if id(param) in head:  # the parent's labels' rows only
                rows = torch.tensor(self.head_rows, dtype=torch.long, device=param.device)
                param[rows] = param[rows].lerp(start[rows], keep)
            else:
                param.lerp_(start, keep)


def continue_from(model: TaskModel, folder: str | Path) -> list[int]:
    """Copy the adapter saved in ``folder`` into ``model`` (just built for the new task,
    not trained yet): peft weights (or the whole body for ``full``) and the head's rows of
    the parent's labels; returns the indices of those head rows. ConfigError /
    FingerprintMismatch, changing nothing, when the parent does not fit."""
    folder = Path(folder)
    info, task = read_task(folder), model.task
    where = f"adapter.init_from ({folder})"
    check_parent(
        str(folder), info.method, info.labels, task_method=task.method,
        task_labels=task.labels, where=where,
    )  # fmt: skip
    if (
        info.base_fingerprint
        and task.base_fingerprint
        and (info.base_fingerprint != task.base_fingerprint)
    ):
        raise FingerprintMismatch(
            f"{where}: the parent was trained on base "
            f"{describe_base(info.base_fingerprint, info.base or {})}, but this one is "
            f"{describe_base(task.base_fingerprint, task.base or {})}; continue it on its own base"
        )
    if model.base_rewrite is not None or info.start is not None:
        raise ConfigError(
            f"{where}: a PiSSA / OLoRA start rewrites the base; continuing needs the default "
            "LoRA init on both (drop adapter.peft.init_lora_weights)"
        )
    if info.head_normalize != bool(getattr(model.head, "normalize", False)):
        raise ConfigError(f"{where}: the parent has a cosine head and this task does not")
    state = _body_state(model, folder, info.method)
    rows = _head_rows(folder, info.labels, task.labels)
    _load_body(model, state, info.method, where)
    with torch.no_grad():
        weight, bias = model.head.linear.weight, model.head.linear.bias
        for new, old in rows["map"]:
            weight[new].copy_(rows["weight"][old])
            bias[new].copy_(rows["bias"][old])
    return [new for new, _ in rows["map"]]


def _body_state(model: TaskModel, folder: Path, method: str) -> dict[str, torch.Tensor] | None:
    """The parent's body weights to load (None for a probe), after checking the peft shape."""
    from safetensors.torch import load_file

    saved_as = method_row(method).saved_as
    if saved_as == "head":
        return None
    if saved_as == "model":
        return _read(load_file, folder / "model.safetensors")
    parent = _read(lambda p: json.loads(Path(p).read_text()), folder / "adapter_config.json")
    ours = model.body.peft_config["default"].to_dict()  # type: ignore[union-attr, index, operator]
    for key in SHAPE_FIELDS:
        a, b = _plain(parent.get(key)), _plain(ours.get(key))
        if a != b:
            raise ConfigError(
                f"adapter.init_from ({folder}): the parent's {key} is {a!r} but this preset's is "
                f"{b!r}; continuing needs the same adapter shape (set adapter.peft.{key})"
            )
    return _read(load_file, folder / "adapter_model.safetensors")


def _read(reader: Any, path: Path) -> Any:
    try:
        return reader(str(path))
    except Exception as exc:  # safetensors and json raise several types on a damaged file
        raise IntegrityError(f"{path} cannot be read: {exc}") from exc


def _plain(value: Any) -> Any:
    """A config value comparable across JSON and peft's objects (lists and sets sorted)."""
    value = getattr(value, "value", value)  # an enum (PeftType.LORA) as its JSON form
    if isinstance(value, (list, tuple, set, frozenset)):
        return sorted(str(v) for v in value)
    return value


def _load_body(model: TaskModel, state: dict[str, torch.Tensor] | None, method: str, where: str):
    if state is None:
        return
    try:
        if method_row(method).saved_as == "model":
            model.body.load_state_dict(state, strict=True)
            return
        from peft import set_peft_model_state_dict

        result: Any = set_peft_model_state_dict(model.body, state, adapter_name="default")
    except RuntimeError as exc:  # a shape that does not fit
        raise ConfigError(f"{where}: the parent's weights do not fit this adapter: {exc}") from None
    # prompt learning's embeddings load apart from the module's own keys (peft does it)
    prompt = "prompt_embeddings" in state
    unexpected = [k for k in result.unexpected_keys if not (prompt and k == "prompt_embeddings")]
    missing = [
        k for k in result.missing_keys
        if "default" in k and "base_layer" not in k and not (prompt and "prompt_encoder" in k)
    ]  # fmt: skip
    if unexpected or missing:
        raise ConfigError(
            f"{where}: the parent's weights do not match this adapter's (unexpected "
            f"{unexpected[:3]}, missing {missing[:3]})"
        )


def _head_rows(folder: Path, parent: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    from peftkit.adapters.folder import load_head

    head = load_head(folder, read_task(folder)).linear
    index = {x: i for i, x in enumerate(parent)}
    pairs = [(i, index[x]) for i, x in enumerate(labels) if x in index]
    return {"weight": head.weight.detach(), "bias": head.bias.detach(), "map": pairs}
