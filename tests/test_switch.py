from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import synthetic

from peftkit.adapters.folder import release, save_adapter
from peftkit.config.presets import load_preset
from peftkit.data.load import Split, TextDataset
from peftkit.errors import ConfigError, FingerprintMismatch, IntegrityError, RegistryError
from peftkit.models.base import load_base
from peftkit.registry.store import Registry
from peftkit.serving.adapted import AdaptedModel
from peftkit.training.train import TrainConfig, train

TASKS = {"sentiment": "lora", "topic": "lora", "spam": "probe"}
PROBE_TEXTS = [
    "the movie was great",
    "stock market price",
    "free prize now",
    "bad film",
    "the election vote",
    "hello ok",
]


def _train_into(base, registry, name, task, preset, root: Path):
    data = synthetic(task)
    spec = load_preset(preset)
    config = TrainConfig(
        max_steps=24,
        batch_size=8,
        learning_rate=5e-2,
        progress=False,
        patience=None,
        eval_every=1000,
    )
    result = train(base, spec, data, config, root / f"run-{name}")
    result.model.eval()
    tensors = base.tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = result.model(tensors["input_ids"], tensors["attention_mask"])
    folder = save_adapter(
        result.model,
        root / f"run-{name}" / "adapter",
        method=spec.method,
        labels=data.labels,
        max_length=config.max_length,
    )
    release(result.model)
    registry.register(
        name,
        folder,
        method=spec.method,
        labels=data.labels,
        base_fingerprint=base.fingerprint.id,
        base=base.fingerprint.to_dict(),
        metrics=result.test_metrics,
    )
    return torch.softmax(logits, -1).numpy()


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("switch")
    base = load_base(tiny_models["bert"])
    registry = Registry(root / "registry")
    expected = {
        name: _train_into(base, registry, name, name, method, root)
        for name, method in TASKS.items()
    }
    return base, registry, expected, root


@pytest.fixture()
def model(served):
    base, registry, _, _ = served
    am = AdaptedModel(base, registry, max_resident=3)
    yield am
    am.close()


def test_predictions_equal_the_trained_model(served, model):
    _, _, expected, _ = served
    for name, probs in expected.items():
        got = model.predict_proba(PROBE_TEXTS, adapter=name)
        np.testing.assert_allclose(got, probs, atol=1e-5)


def test_adapters_change_the_output(served, model):
    a = model.predict_proba(PROBE_TEXTS, adapter="sentiment")
    model.use("spam")
    b = model.predict_proba(PROBE_TEXTS)
    assert a.shape == b.shape == (len(PROBE_TEXTS), 2)
    assert np.abs(a - b).max() > 1e-3


def test_mixed_batch_rows_equal_single_adapter_results(model):
    names = ["sentiment", "topic", "spam", "topic", "sentiment", "spam"]
    mixed = model.predict_mixed(PROBE_TEXTS, names)
    assert [p.adapter for p in mixed] == names
    assert [len(p.probs) for p in mixed] == [2, 4, 2, 4, 2, 2]  # each row its own label set
    for text, name, row in zip(PROBE_TEXTS, names, mixed, strict=True):
        alone = model.predict([text], adapter=name)[0]
        assert alone.label == row.label
        for label, value in alone.probs.items():
            assert abs(row.probs[label] - value) <= 1e-5


def test_use_switches_and_lru_evicts(served):
    base, registry, _, _ = served
    am = AdaptedModel(base, registry, max_resident=2)
    try:
        am.use("sentiment").use("topic")
        assert am.resident == ["sentiment@1", "topic@1"]
        am.use("sentiment")  # touch: topic is now least recent
        am.use("spam")
        assert am.resident == ["sentiment@1", "spam@1"]
        assert am.current == "spam"
        assert am.predict(["free prize now"])[0].adapter == "spam"
        assert am.predict(["free prize now"])[0].ref == "spam@1"
        am.use("topic")  # reloads after eviction
        assert am.resident == ["spam@1", "topic@1"]
    finally:
        am.close()


def test_versions_resolve(served, model):
    _, registry, _, _ = served
    assert registry.get("sentiment").version == 1
    a = model.predict_proba(["bad film"], adapter="sentiment@1")
    b = model.predict_proba(["bad film"], adapter="sentiment")
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_unknown_adapter_gets_closest_names(model):
    with pytest.raises(RegistryError, match="did you mean 'sentiment'"):
        model.use("sentimnt")
    with pytest.raises(RegistryError, match="no adapter in use"):
        model.predict(["x"])


def test_adapter_from_another_base_is_refused(served, tiny_models, tmp_path):
    _, registry, _, _ = served
    other = tmp_path / "other"
    shutil.copytree(tiny_models["bert"], other)
    changed = load_base(other)
    with torch.no_grad():
        changed.model.embeddings.word_embeddings.weight.mul_(1.5)
    changed.model.save_pretrained(other)
    am = AdaptedModel(load_base(other), registry)
    with pytest.raises(FingerprintMismatch, match="trained on base .* but the loaded base is"):
        am.use("sentiment")


def test_corrupt_adapter_is_refused_and_the_rest_still_serve(served, tmp_path):
    base, registry, _, root = served
    data = synthetic("spam")
    folder = root / "run-spam" / "adapter"
    entry = registry.register(
        "fragile", folder, method="probe", labels=data.labels, base_fingerprint=base.fingerprint.id
    )
    head = entry.path / "head.safetensors"
    raw = bytearray(head.read_bytes())
    raw[-1] ^= 0xFF
    head.write_bytes(bytes(raw))
    am = AdaptedModel(base, registry)
    try:
        with pytest.raises(IntegrityError, match="head.safetensors"):
            am.use("fragile")
        assert "fragile" not in am.resident
        assert am.use("sentiment").predict(["great"])[0].adapter == "sentiment"
    finally:
        am.close()
        registry.remove("fragile", all_versions=True)


def test_threads_get_their_own_adapter_results(model):
    expected = {name: model.predict_proba(PROBE_TEXTS, adapter=name) for name in TASKS}
    errors: list[str] = []

    def work(name):
        for _ in range(5):
            got = model.predict_proba(PROBE_TEXTS, adapter=name)
            if not np.allclose(got, expected[name], atol=1e-5):
                errors.append(name)

    threads = [threading.Thread(target=work, args=(n,)) for n in TASKS for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("method", ["ia3", "prefix", "prompt-tuning"])
def test_other_peft_methods_serve_and_mix(tiny_models, tmp_path, method):
    base = load_base(tiny_models["bert"])
    registry = Registry(tmp_path / "registry")
    expected = {
        "a": _train_into(base, registry, "a", "sentiment", method, tmp_path),
        "b": _train_into(base, registry, "b", "topic", method, tmp_path),
    }
    _train_into(base, registry, "lora-one", "spam", "lora", tmp_path)
    am = AdaptedModel(base, registry)
    try:
        for name, probs in expected.items():
            np.testing.assert_allclose(
                am.predict_proba(PROBE_TEXTS, adapter=name), probs, atol=1e-5
            )
        mixed = am.predict_mixed(PROBE_TEXTS[:2], ["a", "b"])
        np.testing.assert_allclose(list(mixed[1].probs.values()), expected["b"][1], atol=1e-5)
        with pytest.raises(ConfigError, match="serves .* adapters"):
            am.use("lora-one")
    finally:
        am.close()


def test_all_linear_and_qv_lora_adapters_serve_and_mix(tiny_models, tmp_path):
    base = load_base(tiny_models["bert"])
    registry = Registry(tmp_path / "registry")
    expected = {
        "wide": _train_into(base, registry, "wide", "sentiment", "lora-all-linear", tmp_path),
        "qv": _train_into(base, registry, "qv", "topic", "lora", tmp_path),
    }
    am = AdaptedModel(base, registry, max_resident=1)
    try:  # one resident: every switch evicts the other shape of adapter
        for name in ("wide", "qv", "wide"):
            np.testing.assert_allclose(
                am.predict_proba(PROBE_TEXTS, adapter=name), expected[name], atol=1e-5
            )
    finally:
        am.close()
    am = AdaptedModel(base, registry)
    try:
        names = ["wide", "qv"] * 3
        for i, row in enumerate(am.predict_mixed(PROBE_TEXTS, names)):
            np.testing.assert_allclose(list(row.probs.values()), expected[names[i]][i], atol=1e-5)
    finally:
        am.close()


def test_qlora_adapter_serves_on_a_4bit_base(tiny_models, tmp_path):
    base = load_base(tiny_models["bert"], quantization="4bit")
    registry = Registry(tmp_path / "registry")
    expected = _train_into(base, registry, "q", "sentiment", "qlora", tmp_path)
    assert registry.get("q").method == "qlora"
    am = AdaptedModel(base, registry)
    try:
        np.testing.assert_allclose(am.predict_proba(PROBE_TEXTS, adapter="q"), expected, atol=1e-4)
    finally:
        am.close()


def test_template_and_verbalizer_adapter_serves_on_a_causal_lm(tiny_models, tmp_path):
    base = load_base(tiny_models["llama"], kind="causal-lm")
    data = synthetic("sentiment")
    words = {"negative": " bad", "positive": " good"}
    config = TrainConfig(
        max_steps=6,
        batch_size=8,
        learning_rate=5e-2,
        progress=False,
        patience=None,
        eval_every=1000,
    )
    template = "{text} it was"
    result = train(
        base,
        load_preset("lora"),
        data,
        config,
        tmp_path / "run",
        template=template,
        verbalizer=words,
    )
    result.model.eval()
    formatted = [t + " it was" for t in PROBE_TEXTS]
    tensors = base.tokenizer(formatted, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(
            result.model(tensors["input_ids"], tensors["attention_mask"]), -1
        ).numpy()
    folder = save_adapter(
        result.model,
        tmp_path / "adapter",
        method="lora",
        labels=data.labels,
        max_length=config.max_length,
        template=template,
        verbalizer=words,
    )
    release(result.model)
    registry = Registry(tmp_path / "registry")
    registry.register(
        "verb",
        folder,
        method="lora",
        labels=data.labels,
        base_fingerprint=base.fingerprint.id,
        template=template,
        verbalizer=words,
    )
    am = AdaptedModel(base, registry)
    try:
        np.testing.assert_allclose(
            am.predict_proba(PROBE_TEXTS, adapter="verb"), expected, atol=1e-5
        )
    finally:
        am.close()


def test_evicted_lora_slot_is_reused_by_hotswap(served):
    base, registry, expected, _ = served
    am = AdaptedModel(base, registry, max_resident=1)
    try:
        am.use("sentiment")
        am.use("topic")  # evicts sentiment; its layers stay as a free slot
        am.use("sentiment")  # same LoRA shape: hot-swapped into topic's old slot
        np.testing.assert_allclose(am.predict_proba(PROBE_TEXTS), expected["sentiment"], atol=1e-5)
        np.testing.assert_allclose(
            am.predict_proba(PROBE_TEXTS, adapter="topic"), expected["topic"], atol=1e-5
        )
        assert len(am._peft.peft_config) <= 2
    finally:
        am.close()


def test_batch_naming_more_adapters_than_resident_is_refused(served):
    base, registry, _, _ = served
    am = AdaptedModel(base, registry, max_resident=2)
    try:
        with pytest.raises(ConfigError, match="names 3 adapters but max_resident=2"):
            am.predict_mixed(PROBE_TEXTS[:3], ["sentiment", "topic", "spam"])
    finally:
        am.close()


# -- the registry changing under a running AdaptedModel -------------------------------------


def _register_copy(served, registry, name, task):
    """Register the adapter the module's fixture trained for ``task`` under ``name``."""
    base, _, _, root = served
    return registry.register(
        name,
        root / f"run-{task}" / "adapter",
        method=TASKS[task],
        labels=synthetic(task).labels,
        base_fingerprint=base.fingerprint.id,
    )


def test_names_follow_the_registry_and_removed_adapters_stop_serving(served, tmp_path):
    base, _, expected, _ = served
    registry = Registry(tmp_path / "registry")
    _register_copy(served, registry, "live", "sentiment")
    am = AdaptedModel(base, registry, max_resident=4)
    try:
        first = am.use("live").predict(PROBE_TEXTS)
        assert {p.ref for p in first} == {"live@1"} and len(first[0].probs) == 2
        _register_copy(served, registry, "live", "topic")  # live@2: another task, 4 labels
        now = am.predict(PROBE_TEXTS)
        assert {p.ref for p in now} == {"live@2"} and {p.adapter for p in now} == {"live"}
        np.testing.assert_allclose(am.predict_proba(PROBE_TEXTS), expected["topic"], atol=1e-5)
        pinned = am.predict_proba(PROBE_TEXTS, adapter="live@1")  # still served
        np.testing.assert_allclose(pinned, expected["sentiment"], atol=1e-5)
        assert am.resident == ["live@2", "live@1"]
        registry.remove("live@2")  # the name falls back to version 1; @2 is evicted
        assert am.predict(PROBE_TEXTS[:1])[0].ref == "live@1"
        assert am.resident == ["live@1"]
        with pytest.raises(RegistryError, match="no version 2"):
            am.predict(PROBE_TEXTS[:1], adapter="live@2")
        registry.remove("live", all_versions=True)
        with pytest.raises(RegistryError, match="no adapter named 'live'"):
            am.predict(PROBE_TEXTS[:1])
        with pytest.raises(RegistryError, match="'live'"):
            am.predict_proba(PROBE_TEXTS[:1], adapter="live@1")
        assert am.resident == []
    finally:
        am.close()


def test_an_alias_is_served_like_a_name_and_follows_its_moves(served, tmp_path):
    base, _, expected, _ = served
    registry = Registry(tmp_path / "registry")
    _register_copy(served, registry, "live", "sentiment")
    _register_copy(served, registry, "live", "spam")
    registry.alias("live@1", "production")
    am = AdaptedModel(base, registry, max_resident=4)
    try:
        first = am.predict(PROBE_TEXTS, adapter="live@production")
        assert {p.ref for p in first} == {"live@1"} and {p.adapter for p in first} == {
            "live@production"
        }
        np.testing.assert_allclose(
            am.predict_proba(PROBE_TEXTS, adapter="live@production"), expected["sentiment"],
            atol=1e-5,
        )  # fmt: skip
        registry.alias("live@2", "production")  # moved: the same object serves version 2
        assert am.predict(PROBE_TEXTS[:1], adapter="live@production")[0].ref == "live@2"
        np.testing.assert_allclose(
            am.predict_proba(PROBE_TEXTS, adapter="live@production"), expected["spam"], atol=1e-5
        )
        am.evict("live@production")
        assert am.resident == ["live@1"]
    finally:
        am.close()


def test_names_are_resolved_again_only_when_the_registry_changed(served, tmp_path, monkeypatch):
    base = served[0]
    registry = Registry(tmp_path / "registry")
    _register_copy(served, registry, "live", "sentiment")
    am = AdaptedModel(base, registry)
    try:
        am.use("live").predict(["good"])
        lookups = []
        original = registry.get
        monkeypatch.setattr(registry, "get", lambda ref: lookups.append(ref) or original(ref))
        for _ in range(5):
            am.predict(["good"])
            am.predict_mixed(["good", "bad"], ["live", "live@1"])
        assert lookups == []  # the generation did not change: nothing looked up
        registry.set_metrics("live", {"f1": 1.0})  # a write: the generation moves
        lookups.clear()
        am.predict(["good"])
        assert lookups == ["live"]
    finally:
        am.close()


# -- sentence pairs -----------------------------------------------------------------------


def _pairs(n: int, seed: int) -> Split:
    """Rows whose label is carried by the second text only (the first is filler)."""
    rng = __import__("random").Random(seed)
    cues = {0: ["bad", "awful", "boring"], 1: ["good", "great", "fun"]}
    texts, pairs, labels = [], [], []
    for i in range(n):
        y = i % 2
        texts.append(" ".join(rng.choice(["the", "a", "movie", "news"]) for _ in range(3)))
        pairs.append(f"it was {rng.choice(cues[y])}")
        labels.append(y)
    return Split(tuple(texts), tuple(labels), tuple(pairs))


def test_a_pair_adapter_serves_its_pairs_as_training_encoded_them(tiny_models, tmp_path):
    base = load_base(tiny_models["bert"])
    data = TextDataset(
        "pairs",
        ("negative", "positive"),
        {"train": _pairs(64, 0), "validation": _pairs(16, 1), "test": _pairs(16, 2)},
    )
    config = TrainConfig(
        max_steps=16,
        batch_size=8,
        learning_rate=5e-2,
        progress=False,
        patience=None,
        eval_every=1000,
    )
    spec = load_preset("lora")
    result = train(base, spec, data, config, tmp_path / "run")
    result.model.eval()
    probe = _pairs(6, 3)
    tensors = base.tokenizer(
        list(probe.texts), list(probe.text_pairs), padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = result.model(tensors["input_ids"], tensors["attention_mask"])
    expected = torch.softmax(logits, -1).numpy()
    folder = save_adapter(
        result.model,
        tmp_path / "adapter",
        method="lora",
        labels=data.labels,
        max_length=config.max_length,
    )
    release(result.model)
    registry = Registry(tmp_path / "registry")
    registry.register(
        "nli", folder, method="lora", labels=data.labels, base_fingerprint=base.fingerprint.id
    )
    am = AdaptedModel(base, registry)
    try:
        got = am.predict_proba(probe.texts, adapter="nli", text_pairs=probe.text_pairs)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        alone = am.predict_proba(probe.texts, adapter="nli")  # the pairs really count
        assert np.abs(alone - expected).max() > 1e-4
        rows = am.predict_mixed(probe.texts, ["nli"] * 6, text_pairs=probe.text_pairs)
        np.testing.assert_allclose([list(r.probs.values()) for r in rows], expected, atol=1e-5)
        with pytest.raises(ConfigError, match="6 texts but 2 text_pairs"):
            am.predict(probe.texts, adapter="nli", text_pairs=probe.text_pairs[:2])
    finally:
        am.close()
