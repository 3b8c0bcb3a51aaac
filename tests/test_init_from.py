"""``adapter.init_from``: a continued adapter starts exactly where its parent stopped (weights
and head rows, bitwise), a label superset adds fresh rows, the new version records its
lineage, and every bad parent is one line before the base loads."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from helpers import synthetic
from test_recipes import GOOD, write_data, write_recipe

from peftkit.adapters.model import TaskModel, build_task_model
from peftkit.adapters.parent import ParentWeights, continue_from, label_order
from peftkit.config.presets import load_preset
from peftkit.config.recipes import load_recipe
from peftkit.data.batching import encode
from peftkit.data.load import TextDataset
from peftkit.errors import ConfigError, FingerprintMismatch, RegistryError
from peftkit.models.base import load_base
from peftkit.registry.store import Registry
from peftkit.run.pipeline import run_recipe
from peftkit.training.train import TrainConfig, train

QUICK = dict(batch_size=8, progress=False, eval_every=1000, patience=None)
LABELS = ["negative", "positive"]


def logits(model, texts, tokenizer) -> torch.Tensor:
    enc = encode(tokenizer, texts, [0] * len(texts), 32)
    ids = [torch.tensor(x) for x in enc.ids]
    out = []
    with torch.no_grad():
        for row in ids:
            out.append(model(row[None], torch.ones_like(row)[None])[0])
    return torch.stack(out)


def parent_folder(base, spec, tmp_path: Path, data: TextDataset) -> Path:
    config = TrainConfig(max_steps=6, learning_rate=5e-3, **QUICK)
    with train(base, spec, data, config, tmp_path / "parent-run") as result:
        return result.model.save_pretrained(tmp_path / "parent")


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix", "full", "probe"])
def test_a_continued_model_starts_at_its_parent(tiny_models, tmp_path, method):
    spec = load_preset(method)
    base = load_base(tiny_models["bert"], kind="encoder")
    data = synthetic("sentiment", n=32)
    folder = parent_folder(base, spec, tmp_path, data)
    texts = list(data.split("test").texts[:6])
    with TaskModel.from_pretrained(base, folder) as parent:
        expected = logits(parent, texts, base.tokenizer)
    with build_task_model(base, spec, labels=data.labels, seed=7) as fresh:
        fresh.eval()
        unrelated = logits(fresh, texts, base.tokenizer)
        continue_from(fresh, folder)
        started = logits(fresh, texts, base.tokenizer)
    assert not torch.allclose(unrelated, expected)  # the fresh start is another model
    torch.testing.assert_close(started, expected, rtol=0, atol=1e-6)


def test_train_with_init_from_starts_from_the_parent(tiny_models, tmp_path):
    """One step at a learning rate of 1e-12 leaves the model where it started: the parent."""
    spec = load_preset("lora")
    base = load_base(tiny_models["bert"], kind="encoder")
    data = synthetic("sentiment", n=32)
    folder = parent_folder(base, spec, tmp_path, data)
    texts = list(data.split("test").texts[:6])
    with TaskModel.from_pretrained(base, folder) as parent:
        expected = logits(parent, texts, base.tokenizer)
    config = TrainConfig(max_steps=1, learning_rate=1e-12, weight_decay=0.0, **QUICK)
    with train(base, spec, data, config, tmp_path / "child", init_from=folder) as child:
        torch.testing.assert_close(logits(child.model, texts, base.tokenizer), expected,
                                   rtol=0, atol=1e-5)  # fmt: skip
    fresh_config = TrainConfig(max_steps=1, learning_rate=1e-12, weight_decay=0.0, seed=3, **QUICK)
    with train(base, spec, data, fresh_config, tmp_path / "fresh") as fresh:
        assert not torch.allclose(logits(fresh.model, texts, base.tokenizer), expected, atol=1e-3)


def test_a_label_superset_keeps_the_old_rows_bitwise_and_adds_fresh_ones(tiny_models, tmp_path):
    spec = load_preset("lora")
    base = load_base(tiny_models["bert"], kind="encoder")
    folder = parent_folder(base, spec, tmp_path, synthetic("sentiment", n=32))
    parent = TaskModel.from_pretrained(base, folder)
    old_w, old_b = parent.head.linear.weight.clone(), parent.head.linear.bias.clone()
    parent.release()
    # the new data names the labels in another order and adds one: rows match by name
    labels = ("positive", "neutral", "negative")
    assert label_order(LABELS, labels) == ("negative", "positive", "neutral")
    with build_task_model(base, spec, labels=labels, seed=5) as model:
        fresh_neutral = model.head.linear.weight[1].clone()
        continue_from(model, folder)
        weight, bias = model.head.linear.weight, model.head.linear.bias
        assert torch.equal(weight[0], old_w[1]) and torch.equal(bias[0], old_b[1])  # positive
        assert torch.equal(weight[2], old_w[0]) and torch.equal(bias[2], old_b[0])  # negative
        assert torch.equal(weight[1], fresh_neutral)  # neutral: as a fresh head starts it


def test_a_parent_of_another_shape_or_method_is_refused(tiny_models, tmp_path):
    base = load_base(tiny_models["bert"], kind="encoder")
    folder = parent_folder(base, load_preset("lora"), tmp_path, synthetic("sentiment", n=32))
    wider = load_preset("lora", {"peft": {"r": 16}})
    with (
        build_task_model(base, wider, labels=LABELS) as model,
        pytest.raises(ConfigError, match="parent's r is 8 but this preset's is 16"),
    ):
        continue_from(model, folder)
    with (
        build_task_model(base, load_preset("ia3"), labels=LABELS) as model,
        pytest.raises(ConfigError, match="is a lora adapter but this task trains ia3"),
    ):
        continue_from(model, folder)
    with (
        build_task_model(base, load_preset("lora"), labels=["ham", "spam"]) as model,
        pytest.raises(ConfigError, match=r"lacks .* labels \['negative', 'positive'\]"),
    ):
        continue_from(model, folder)
    other = load_base(tiny_models["llama"], kind="encoder")
    with (
        build_task_model(other, load_preset("lora"), labels=LABELS) as model,
        pytest.raises(FingerprintMismatch, match="trained on base .* but this one is"),
    ):
        continue_from(model, folder)


# --- in a recipe -------------------------------------------------------------------------


def run(tmp_path, tiny_models, name, data, extra=(), base="bert"):
    path = write_recipe(
        tmp_path, GOOD.replace("base: minilm", f"base: {tiny_models[base]}"), f"{name}.yaml"
    )
    overrides = [f"data.source={data}", "training.max_steps=2", "training.batch_size=8", *extra]
    echo = io.StringIO()
    outcome = run_recipe(
        load_recipe(path, overrides), run_dir=tmp_path / name, registry=tmp_path / "reg",
        out=echo,
    )  # fmt: skip
    return outcome, echo.getvalue()


def test_a_recipe_continues_a_registered_adapter_and_records_its_lineage(
    tmp_path, tiny_models, reset_accelerate
):
    first = write_data(tmp_path / "d1", LABELS)
    outcome, _ = run(tmp_path, tiny_models, "first", first)
    (parent_ref,) = outcome.entries
    wider = write_data(tmp_path / "d2", ["positive", "neutral", "negative"], seed=1)
    outcome, text = run(
        tmp_path, tiny_models, "second", wider,
        [f"adapter.init_from={parent_ref}", "registry.name=continued"],
    )  # fmt: skip
    assert f"continues {parent_ref} (adapter.init_from)" in text
    with Registry(tmp_path / "reg") as reg:
        entry = reg.get(outcome.entries[0])
        parent = reg.get(parent_ref)
    # the parent's labels first, in its order; the new one after
    assert entry.labels == ("negative", "positive", "neutral")
    assert entry.lineage["parent"] == parent_ref and entry.lineage["replay"] is None
    assert set(entry.lineage["data"]) == {"train", "validation", "test"}
    assert entry.lineage["data"] != parent.lineage["data"]
    assert parent.lineage["parent"] is None


@pytest.mark.parametrize(
    ("override", "error", "expected"),
    [
        ("adapter.init_from=nope@1", RegistryError, "init_from: nope@1: "),
        ("adapter=ia3", ConfigError, "is a lora adapter but this task trains ia3"),
        ("adapter.init_from=previous", ConfigError, "the first task has no task before it"),
        ("data.source=SPAM", ConfigError, r"the data lacks first@1's labels \['negative', "),
        (
            "base=LLAMA",
            FingerprintMismatch,
            r"was trained on base .*bert.* but this recipe's base is .*llama",
        ),
    ],
)
def test_a_bad_parent_is_refused_before_the_base_loads(
    tmp_path, tiny_models, reset_accelerate, override, error, expected
):
    data = write_data(tmp_path / "d1", LABELS)
    run(tmp_path, tiny_models, "first", data)
    spam = write_data(tmp_path / "spam", ["ham", "spam"])
    extra = ["adapter.init_from=first@1", "registry.name=child"]
    extra.append(override.replace("SPAM", str(spam)).replace("LLAMA", str(tiny_models["llama"])))
    if override == "adapter=ia3":
        extra = ["adapter.preset=ia3", "adapter.peft={}", *extra[:-1]]
    with pytest.raises(error, match=expected) as err:
        run(tmp_path, tiny_models, "child", data, extra)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "child").exists()  # nothing written


# --- adapter.keep_parent: the parent's weights blended back in after training -------------


def trained_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_keep_parent_blends_each_trained_tensor_and_only_the_parents_head_rows(
    tiny_models, tmp_path
):
    spec = load_preset("lora")
    base = load_base(tiny_models["bert"], kind="encoder")
    folder = parent_folder(base, spec, tmp_path, synthetic("sentiment", n=32))
    labels = ("negative", "positive", "neutral")  # a label superset: row 2 is new
    with build_task_model(base, spec, labels=labels, seed=5) as model:
        start = ParentWeights(model, continue_from(model, folder))
        assert start.head_rows == [0, 1]
        parent = trained_tensors(model)
        with torch.no_grad():  # "training": every trainable tensor moves
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        trained = trained_tensors(model)
        start.blend_into(model, 0.25)
        blended = trained_tensors(model)
    head = "head.linear.weight"
    assert head in blended and len(blended) > 2  # LoRA factors and the head
    for name, value in blended.items():
        expected = 0.75 * trained[name] + 0.25 * parent[name]
        if name.startswith("head."):  # the new label's row stays as trained
            expected[2] = trained[name][2]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    assert not torch.equal(blended[head][2], parent[head][2])


def test_train_with_keep_parent_equals_the_blend_of_the_trained_child_and_its_parent(
    tiny_models, tmp_path
):
    spec = load_preset("lora")
    base = load_base(tiny_models["bert"], kind="encoder")
    data = synthetic("sentiment", n=32)
    folder = parent_folder(base, spec, tmp_path, data)
    with TaskModel.from_pretrained(base, folder) as parent_model:  # loaded frozen: every tensor
        parent = {n: p.detach().clone() for n, p in parent_model.named_parameters()}
    config = TrainConfig(max_steps=4, learning_rate=5e-3, **QUICK)
    with train(base, spec, data, config, tmp_path / "plain", init_from=folder) as child:
        trained = trained_tensors(child.model)
    with train(
        base, spec, data, config, tmp_path / "kept", init_from=folder, keep_parent=0.5
    ) as kept:
        blended = trained_tensors(kept.model)
        assert kept.test_metrics  # the test split was scored on the blended weights
    assert set(blended) == set(trained) and set(blended) <= set(parent)
    assert any(not torch.allclose(trained[n], parent[n]) for n in trained)  # it trained
    for name in blended:
        torch.testing.assert_close(
            blended[name], 0.5 * trained[name] + 0.5 * parent[name], rtol=0, atol=1e-5
        )
    with pytest.raises(ConfigError, match="keep_parent blends .* needs adapter.init_from"):
        train(base, spec, data, config, tmp_path / "orphan", keep_parent=0.5)


def test_a_recipe_keeps_part_of_its_parent_and_records_it(tmp_path, tiny_models, reset_accelerate):
    first = write_data(tmp_path / "d1", LABELS)
    outcome, _ = run(tmp_path, tiny_models, "first", first)
    (parent_ref,) = outcome.entries
    outcome, text = run(
        tmp_path, tiny_models, "second", first,
        [f"adapter.init_from={parent_ref}", "adapter.keep_parent=0.3", "registry.name=kept"],
    )  # fmt: skip
    assert f"continues {parent_ref} (adapter.init_from; keeps 0.3 of its weights" in text
    with Registry(tmp_path / "reg") as reg:
        entry = reg.get(outcome.entries[0])
    assert entry.lineage["parent"] == parent_ref and entry.lineage["keep_parent"] == 0.3


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["adapter.keep_parent=0.5"], "keep_parent blends .* give adapter.init_from too"),
        (["adapter.init_from=first@1", "adapter.keep_parent=1"], r"must be in \[0, 1\)"),
        (["adapter.init_from=first@1", "adapter.keep_parent=-0.1"], r"must be in \[0, 1\)"),
    ],
)
def test_a_bad_keep_parent_is_one_line_naming_the_key(tmp_path, tiny_models, extra, expected):
    path = write_recipe(tmp_path, GOOD, "kept.yaml")
    with pytest.raises(ConfigError, match=expected) as err:
        load_recipe(path, extra)
    assert "\n" not in str(err.value) and "keep_parent" in str(err.value)
