"""Few-shot prototype heads (peftkit.fewshot): construction, serving, training from them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import synthetic

from peftkit.adapters import load_preset
from peftkit.artifacts import read_task, release, save_adapter
from peftkit.base import load_base
from peftkit.data import few_shot
from peftkit.errors import ConfigError, DataError
from peftkit.fewshot import label_embeddings, prototype_head, prototype_probe
from peftkit.prompts import Verbalizer, parse_prompt_set
from peftkit.registry import Registry
from peftkit.scorers import embed_texts
from peftkit.switch import AdaptedModel
from peftkit.train import TrainConfig, train

DESCRIPTIONS = {"negative": ["bad", "awful"], "positive": "good"}


@pytest.fixture(scope="module")
def bert(tiny_models):
    return load_base(str(tiny_models["bert"]))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_prototypes_are_centroids_plus_the_label_prior(bert):
    data = synthetic("sentiment", n=40)
    support = few_shot(data.split("train"), 4, seed=1, label_names=data.labels)
    feats = embed_texts(bert.model, bert.tokenizer, list(support.texts))
    ys = np.array(support.labels)
    centroids = _unit(np.stack([feats[ys == c].mean(0) for c in range(2)]))
    prior = label_embeddings(bert, data.labels, DESCRIPTIONS)
    want_prior = _unit(
        np.stack(
            [
                embed_texts(bert.model, bert.tokenizer, ["bad", "awful"]).mean(0),
                embed_texts(bert.model, bert.tokenizer, ["good"])[0],
            ]
        )
    )
    np.testing.assert_allclose(prior, want_prior, atol=1e-6)
    for weight in (0.0, 0.5, 2.0):
        head = prototype_head(
            bert, support, data.labels, DESCRIPTIONS, prior=weight, temperature=0.1
        )
        assert head.normalize
        rows = head.linear.weight.detach().numpy() * 0.1
        np.testing.assert_allclose(rows, _unit(centroids + weight * prior), atol=1e-5)
        assert float(head.linear.bias.detach().abs().max()) == 0.0
    # the head scores cosine / temperature of the pooled vector
    test = data.split("test")
    x = torch.as_tensor(embed_texts(bert.model, bert.tokenizer, list(test.texts)))
    logits = head(x * 3.0).detach().numpy()  # the length of the vector does not matter
    np.testing.assert_allclose(logits, x.numpy() @ rows.T / 0.1, atol=1e-4)


def test_verbalizer_descriptions_and_bad_input(bert):
    data = synthetic("sentiment", n=20)
    support = few_shot(data.split("train"), 2, label_names=data.labels)
    verbalizer = Verbalizer((("negative", (" bad",)), ("positive", (" good", " fun"))))
    from_verbalizer = label_embeddings(bert, data.labels, verbalizer)
    from_mapping = label_embeddings(
        bert, data.labels, {"negative": "bad", "positive": ["good", "fun"]}
    )
    np.testing.assert_allclose(from_verbalizer, from_mapping, atol=1e-6)
    # a prompt set describes its labels by its descriptions, else by its first template
    described = parse_prompt_set(
        "family: f\nlabels: [negative, positive]\nverbalizer: {negative: ' no', positive: ' yes'}"
        "\ndescriptions: {negative: bad, positive: [good, fun]}\ntemplates: {t: '{text}'}"
    )
    np.testing.assert_allclose(
        label_embeddings(bert, data.labels, described), from_mapping, atol=1e-6
    )
    words = label_embeddings(bert, data.labels, {"negative": "no", "positive": "yes"})
    undescribed = replace(described, descriptions=None)
    np.testing.assert_allclose(label_embeddings(bert, data.labels, undescribed), words, atol=1e-6)
    with pytest.raises(DataError, match="no entry for label.*'positive'"):
        label_embeddings(bert, data.labels, {"negative": "bad"})
    with pytest.raises(ConfigError, match="prior must be >= 0"):
        prototype_head(bert, support, data.labels, prior=-1)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        prototype_head(bert, support, data.labels, temperature=0)


def test_a_prototype_probe_registers_and_serves_with_its_cosine_head(bert, tmp_path):
    data = synthetic("sentiment", n=40)
    support = few_shot(data.split("train"), 4, label_names=data.labels)
    head = prototype_head(bert, support, data.labels, DESCRIPTIONS)
    model = prototype_probe(bert, head)
    folder = save_adapter(
        model, tmp_path / "proto", method="probe", labels=data.labels, max_length=32
    )
    assert read_task(folder).head_normalize
    registry = Registry(tmp_path / "reg")
    registry.register(
        "proto", folder, method="probe", labels=data.labels,
        base_fingerprint=bert.fingerprint.id, base=bert.fingerprint.to_dict(),
    )  # fmt: skip
    texts = list(data.split("test").texts)
    served = AdaptedModel(bert, registry).predict_proba(texts, adapter="proto")
    x = torch.as_tensor(embed_texts(bert.model, bert.tokenizer, texts))
    want = torch.softmax(head(x), -1).detach().numpy()
    np.testing.assert_allclose(served, want, atol=1e-5)


def test_training_starts_from_the_given_head(bert, tmp_path):
    data = synthetic("sentiment", n=40)
    support = few_shot(data.split("train"), 4, label_names=data.labels)
    head = prototype_head(bert, support, data.labels, DESCRIPTIONS)
    before = head.linear.weight.detach().clone()
    config = TrainConfig(
        max_steps=2, batch_size=8, learning_rate=1e-9, progress=False, patience=None
    )
    result = train(bert, load_preset("lora"), data, config, tmp_path / "run", head_init=head)
    trained = result.model.head
    assert trained is not head and trained.normalize
    torch.testing.assert_close(trained.linear.weight.detach(), before, atol=1e-5, rtol=0)
    torch.testing.assert_close(head.linear.weight.detach(), before)  # the given head untouched
    release(result.model)
    wrong = prototype_head(
        bert, few_shot(synthetic("topic").split("train"), 2), ("a", "b", "c", "d")
    )
    with pytest.raises(ConfigError, match="head_init has 4 outputs but the data has 2 labels"):
        train(bert, load_preset("lora"), data, config, tmp_path / "run2", head_init=wrong)


def test_a_recipes_prompt_set_describes_the_labels_by_its_descriptions(bert):
    from peftkit.adapters import load_preset
    from peftkit.pipeline import prototype_start
    from peftkit.prompts import load_prompt, load_prompt_set
    from peftkit.recipes import HeadInitSpec

    data = synthetic("sentiment", n=20)
    support = few_shot(data.split("train"), 2, label_names=data.labels)
    spec = load_preset("lora")

    def rows(head):
        return head.linear.weight.detach().numpy()

    start = prototype_start(bert, HeadInitSpec(prompt="sentiment"), spec, data, support)
    want = prototype_head(bert, support, data.labels, load_prompt_set("sentiment"), prior=2.0)
    np.testing.assert_allclose(rows(start), rows(want), atol=1e-6)
    words = load_prompt("sentiment", "it-was").verbalizer
    start = prototype_start(bert, HeadInitSpec(prompt="sentiment/it-was"), spec, data, support)
    np.testing.assert_allclose(
        rows(start), rows(prototype_head(bert, support, data.labels, words)), atol=1e-6
    )
    assert not np.allclose(rows(start), rows(want), atol=1e-3)
