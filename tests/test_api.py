"""The Python API a user meets first: ``import peftkit`` (its names, typed and lazy), a task
model that knows its task, ``save_pretrained`` / ``from_pretrained``, and the shared base
given back by ``with`` or ``release()``."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from helpers import synthetic

import peftkit
from peftkit import (
    AdaptedModel,
    PeftkitError,
    Registry,
    TaskModel,
    TrainConfig,
    build_task_model,
    load_base,
    load_preset,
    train,
)
from peftkit.adapters.folder import read_task, save_adapter
from peftkit.errors import ConfigError, FingerprintMismatch

TEXTS = ["the movie was great", "bad film", "hello ok"]
CONFIG = TrainConfig(max_steps=4, batch_size=8, progress=False, patience=None, eval_every=1000)


@pytest.fixture(scope="module")
def base(tiny_models):
    return load_base(tiny_models["bert"])


def _logits(model, tokenizer) -> torch.Tensor:
    tensors = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(tensors["input_ids"], tensors["attention_mask"])


def _base_out(base) -> torch.Tensor:
    tensors = base.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return base.model(**tensors).last_hidden_state


def _wrapped(base) -> bool:
    """Whether any peft layer is still inside the shared base."""
    return any("lora" in name for name, _ in base.model.named_modules())


# -- import peftkit -----------------------------------------------------------------------


def test_every_name_in_all_resolves_and_dir_lists_them():
    for name in peftkit.__all__:
        assert getattr(peftkit, name) is not None, name
    assert set(peftkit.__all__) <= set(dir(peftkit))
    from peftkit import _LAZY

    assert sorted(peftkit.__all__) == sorted(["__version__", *_LAZY])
    assert peftkit.TaskModel is TaskModel and issubclass(peftkit.PeftkitError, Exception)


def test_import_peftkit_leaves_torch_out():
    code = "import sys, peftkit; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        peftkit.nope  # noqa: B018


# -- a task model knows its task ----------------------------------------------------------


def test_build_task_model_knows_labels_method_length_and_base(base):
    with build_task_model(base, load_preset("lora"), labels=["neg", "pos"]) as model:
        task = model.task
        assert task.labels == ("neg", "pos") and task.method == "lora"
        assert task.id2label == {0: "neg", 1: "pos"} and task.label2id["pos"] == 1
        assert task.max_length == 64  # the tiny BERT's positions
        assert task.base_fingerprint == base.fingerprint.id
        assert task.base == base.fingerprint.to_dict() and task.quantization is None
    # a bare base model (no peftkit Base): labels named as transformers names them
    with build_task_model(base.model, load_preset("probe"), 3, max_length=16) as model:
        assert model.task.labels == ("LABEL_0", "LABEL_1", "LABEL_2")
        assert model.task.base_fingerprint is None and model.task.max_length == 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels=["only"]), "at least 2 labels"),
        (dict(labels=["a", "a"]), "labels must be distinct"),
        (dict(labels="ab"), "must be a list of strings"),
        (dict(labels=["a", "b"], num_labels=3), "num_labels=3 but 2 labels"),
        (dict(), "needs labels="),
    ],
)
def test_bad_labels_are_one_line_errors(base, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_task_model(base, load_preset("probe"), **kwargs)


def test_train_records_the_task_it_trained_for(base, tmp_path):
    data = synthetic("sentiment")
    run = tmp_path / "run"
    with train(base, load_preset("lora"), data, CONFIG, run, template="{text} it was") as result:
        task = result.model.task
    assert task.labels == data.labels and task.template == "{text} it was"
    assert task.max_length == 64  # training.max_length 128, capped at the base's positions


# -- save_pretrained / from_pretrained ----------------------------------------------------


def test_save_pretrained_then_from_pretrained_gives_the_same_model(base, tmp_path):
    data = synthetic("sentiment")
    with train(base, load_preset("lora"), data, CONFIG, tmp_path / "run") as result:
        expected = _logits(result.model, base.tokenizer)
        folder = result.model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((folder / "task.json").read_text())
    assert saved["labels"] == list(data.labels) and saved["method"] == "lora"
    assert saved["base_fingerprint"] == base.fingerprint.id
    assert saved["base"]["source"] == base.fingerprint.source and saved["quantization"] is None
    assert {p.name for p in folder.iterdir()} >= {"adapter_model.safetensors", "head.safetensors"}
    assert not _wrapped(base)
    with TaskModel.from_pretrained(base, folder) as model:
        assert model.task == read_task(folder)
        torch.testing.assert_close(_logits(model, base.tokenizer), expected)
        assert _wrapped(base)
    assert not _wrapped(base)


def test_save_pretrained_never_replaces_a_folder_that_is_not_an_adapters(base, tmp_path):
    data = synthetic("sentiment")
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    with train(base, load_preset("probe"), data, CONFIG, tmp_path / "run") as result:
        with pytest.raises(ConfigError, match=r"holds files that are not .*chapter1.tex"):
            result.model.save_pretrained(mine)
        assert (mine / "chapter1.tex").read_text() == "years of work"
        first = result.model.save_pretrained(tmp_path / "adapter")
        again = result.model.save_pretrained(first)  # an adapter folder: replaced whole
    assert sorted(p.name for p in again.iterdir()) == ["head.safetensors", "task.json"]
    assert not [p for p in tmp_path.iterdir() if ".saving-" in p.name]


@pytest.mark.parametrize("preset", ["probe", "full"])
def test_probe_and_full_round_trip(base, tmp_path, preset):
    data = synthetic("sentiment")
    with train(base, load_preset(preset), data, CONFIG, tmp_path / "run") as result:
        expected = _logits(result.model, base.tokenizer)
        folder = result.model.save_pretrained(tmp_path / "adapter")
    with TaskModel.from_pretrained(base, folder) as model:
        assert model.task.method == preset
        torch.testing.assert_close(_logits(model, base.tokenizer), expected)


def test_from_pretrained_refuses_another_base(base, tiny_models, tmp_path):
    with build_task_model(base, load_preset("lora"), labels=["neg", "pos"]) as model:
        folder = model.save_pretrained(tmp_path / "adapter")
    other = load_base(tiny_models["gpt2"])
    with pytest.raises(FingerprintMismatch, match="was trained on base .*load the base it was"):
        TaskModel.from_pretrained(other, folder)
    with pytest.raises(ConfigError, match="is not a folder"):
        TaskModel.from_pretrained(base, tmp_path / "missing")


def test_save_adapter_defaults_to_the_models_own_task(base, tmp_path):
    with build_task_model(base, load_preset("lora"), labels=["neg", "pos"]) as model:
        plain = read_task(save_adapter(model, tmp_path / "a"))
        given = read_task(save_adapter(model, tmp_path / "b", max_length=32, template="{text}!"))
    assert plain == model.task
    assert given == replace(model.task, max_length=32, template="{text}!")


def test_a_model_built_without_its_task_needs_it_given(base, tmp_path):
    from peftkit.training.prototypes import prototype_probe

    model = prototype_probe(base, build_task_model(base, load_preset("probe"), 2).head)
    with pytest.raises(ConfigError, match="built without its task"):
        model.task  # noqa: B018
    with pytest.raises(ConfigError, match="pass method, labels, max_length="):
        save_adapter(model, tmp_path / "a")
    info = read_task(
        save_adapter(model, tmp_path / "a", method="probe", labels=["a", "b"], max_length=8)
    )
    assert info.labels == ("a", "b") and info.pooling == "mean"


# -- the shared base given back -----------------------------------------------------------


def test_the_base_is_unwrapped_after_the_with_block_and_after_release(base, tmp_path):
    before = _base_out(base)
    with train(base, load_preset("lora"), synthetic(), CONFIG, tmp_path / "run") as result:
        assert _wrapped(base)
    assert not _wrapped(base) and result.model.released
    torch.testing.assert_close(_base_out(base), before)

    model = build_task_model(base, load_preset("lora"), labels=["neg", "pos"])
    assert _wrapped(base)
    model.release()
    model.release()  # again: nothing left to give back
    assert not _wrapped(base)
    with pytest.raises(ConfigError, match="released from the base; save it before release"):
        model.save_pretrained(tmp_path / "late")


def test_the_with_block_releases_when_it_raises(base):
    model = build_task_model(base, load_preset("lora"), labels=["neg", "pos"])
    with pytest.raises(RuntimeError, match="boom"), model:
        raise RuntimeError("boom")
    assert not _wrapped(base)


def test_adapted_model_gives_the_base_back_after_its_with_block(base, tmp_path):
    with build_task_model(base, load_preset("lora"), labels=["neg", "pos"]) as model:
        folder = model.save_pretrained(tmp_path / "adapter")
    registry = Registry(tmp_path / "registry")
    registry.register(
        "sst2", folder, method="lora", labels=["neg", "pos"], base_fingerprint=base.fingerprint.id
    )
    with AdaptedModel(base, registry) as served:
        assert served.use("sst2").predict(TEXTS)[0].label in ("neg", "pos")
        assert _wrapped(base)
    assert not _wrapped(base)
    with pytest.raises(PeftkitError):
        served.predict(TEXTS)  # nothing in use any more
