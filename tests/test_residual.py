"""PiSSA / OLoRA starts: trained on a rewritten base, saved and served as plain LoRA on the
original one, with the shared base put back bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import synthetic

from peftkit.adapters.folder import release, save_adapter
from peftkit.adapters.model import TaskModel, build_task_model
from peftkit.config.presets import spec_from_dict
from peftkit.errors import ConfigError
from peftkit.models.base import load_base
from peftkit.registry.store import Registry
from peftkit.serving.adapted import AdaptedModel
from peftkit.training.train import TrainConfig, train

TEXTS = ["the movie was great", "bad film", "stock market price", "hello ok"]
CONFIG = dict(
    max_steps=8, batch_size=8, learning_rate=5e-2, progress=False, patience=None, eval_every=1000
)


def _spec(init, r=2):
    return spec_from_dict(
        {"method": "lora", "peft": {"r": r, "init_lora_weights": init, "lora_dropout": 0.0}}
    )


def _frozen(base):
    return {n: p.detach().clone() for n, p in base.model.named_parameters()}


def _logits(model, base):
    model.eval()
    t = base.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(t["input_ids"], t["attention_mask"])


@pytest.mark.parametrize(
    ("family", "init"), [("bert", "pissa"), ("gpt2", "pissa"), ("bert", "olora")]
)
def test_a_rewriting_start_is_saved_as_plain_lora_and_the_base_restored(
    tiny_models, tmp_path, family, init
):
    from peftkit.adapters.folder import read_task

    base = load_base(tiny_models[family], kind="encoder")
    frozen = _frozen(base)
    data = synthetic("sentiment")
    result = train(base, _spec(init), data, TrainConfig(**CONFIG), tmp_path / "run")
    rewritten = [n for n, p in base.model.named_parameters() if "base_layer" in n]
    assert rewritten, "the start wrapped no layer"
    changed = [
        n
        for n, p in base.model.named_parameters()
        if "base_layer" in n and not torch.equal(p, frozen[n.replace(".base_layer", "")])
    ]
    assert changed, f"{init} left the base weights as they were: nothing to undo"
    want = _logits(result.model, base)

    folder = save_adapter(
        result.model, tmp_path / "a", method="lora", labels=data.labels, max_length=64
    )
    release(result.model)
    for name, param in base.model.named_parameters():
        assert torch.equal(param, frozen[name]), f"{name} not restored"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["init_lora_weights"] is True
    assert read_task(folder).start == init  # what it was trained from stays on record

    # served from the registry on the untouched base, as any LoRA adapter
    registry = Registry(tmp_path / "reg")
    registry.register(
        "s", folder, method="lora", labels=data.labels,
        base_fingerprint=base.fingerprint.id, base=base.fingerprint.to_dict(),
    )  # fmt: skip
    served = AdaptedModel(base, registry).predict_proba(TEXTS, adapter="s")
    np.testing.assert_allclose(served, torch.softmax(want, -1).numpy(), atol=1e-5)


def test_plain_peft_loads_the_converted_adapter(tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    from peftkit.adapters.folder import load_head, read_task
    from peftkit.adapters.model import pool

    base = load_base(tiny_models["bert"], kind="encoder")
    data = synthetic("sentiment")
    result = train(base, _spec("pissa"), data, TrainConfig(**CONFIG), tmp_path / "run")
    want = _logits(result.model, base)
    folder = save_adapter(
        result.model, tmp_path / "a", method="lora", labels=data.labels, max_length=64
    )
    release(result.model)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_models["bert"]), folder)
    head = load_head(folder, read_task(folder)).eval()
    t = base.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**t).last_hidden_state
        got = head(pool(hidden, t["attention_mask"], "mean"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_mixed_batch_serves_a_pissa_adapter_beside_a_default_one(tiny_models, tmp_path):
    base = load_base(tiny_models["bert"], kind="encoder")
    registry = Registry(tmp_path / "reg")
    for name, init, task in [("p", "pissa", "sentiment"), ("d", True, "topic")]:
        data = synthetic(task)
        result = train(base, _spec(init), data, TrainConfig(**CONFIG), tmp_path / name)
        folder = save_adapter(
            result.model, tmp_path / f"a-{name}", method="lora", labels=data.labels, max_length=64
        )
        release(result.model)
        registry.register(
            name, folder, method="lora", labels=data.labels,
            base_fingerprint=base.fingerprint.id, base=base.fingerprint.to_dict(),
        )  # fmt: skip
    am = AdaptedModel(base, registry)
    alone = {n: am.predict_proba(TEXTS, adapter=n) for n in ("p", "d")}
    mixed = am.predict_mixed(TEXTS, ["p", "d", "d", "p"])
    for i, (row, name) in enumerate(zip(mixed, ["p", "d", "d", "p"], strict=True)):
        np.testing.assert_allclose(list(row.probs.values()), alone[name][i], atol=1e-5)


def test_a_failed_rewriting_run_gives_the_base_back(tiny_models, tmp_path, monkeypatch):
    import peftkit.training.train

    def fail(self):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(peftkit.training.train.TrainLoop, "run", fail)
    base = load_base(tiny_models["bert"], kind="encoder")
    frozen = _frozen(base)
    with pytest.raises(RuntimeError, match="interrupted"):
        train(base, _spec("pissa"), synthetic("sentiment"), TrainConfig(**CONFIG), tmp_path / "r")
    for name, param in base.model.named_parameters():
        assert torch.equal(param, frozen[name]), f"{name} not restored"


@pytest.mark.parametrize("init", ["corda", "lora_ga", "eva", "loftq"])
def test_starts_peftkit_cannot_run_are_refused_before_training(init):
    with pytest.raises(ConfigError, match=f"init_lora_weights='{init}' is not supported"):
        _spec(init)


def test_a_rewriting_start_on_a_quantized_base_is_refused(tiny_models):
    with pytest.raises(ConfigError, match="shared quantized base"):
        spec_from_dict({"method": "qlora", "peft": {"init_lora_weights": "pissa"}})
    base = load_base(tiny_models["bert"], kind="encoder", quantization="8bit")
    with pytest.raises(ConfigError, match="shared quantized base"):
        build_task_model(base.model, _spec("olora"), num_labels=2)


def test_an_adapter_built_outside_peftkit_with_a_rewriting_start_is_not_saved(
    tiny_models, tmp_path
):
    """Without peftkit's record of the original weights the adapter cannot be converted
    back, and saved as it is it would be wrong on the unchanged base."""
    import peft

    from peftkit.adapters.model import Head

    base = load_base(tiny_models["bert"], kind="encoder")
    body = peft.get_peft_model(
        base.model,
        peft.LoraConfig(r=2, init_lora_weights="pissa", target_modules=["query", "value"]),
    )
    model = TaskModel(body, Head(base.model.config.hidden_size, 2), "mean")
    with pytest.raises(ConfigError, match="pissa.*rewrote the base"):
        save_adapter(model, tmp_path / "a", method="lora", labels=("a", "b"), max_length=8)
    assert not (tmp_path / "a").exists()
