"""Few-shot prototype heads (peftkit.training.prototypes): construction, serving, training from them."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import synthetic

from peftkit.adapters.folder import read_task, release, save_adapter
from peftkit.config.presets import load_preset
from peftkit.data.load import few_shot
from peftkit.errors import ConfigError, DataError
from peftkit.models.base import load_base
from peftkit.prompting.scorers import embed_texts
from peftkit.prompting.templates import Verbalizer, parse_prompt_set
from peftkit.registry.store import Registry
from peftkit.serving.adapted import AdaptedModel
from peftkit.training.prototypes import (
    Prototypes,
    label_embeddings,
    prototype_head,
    prototype_probe,
)
from peftkit.training.train import TrainConfig, train

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


def _centroid_rows(feats: np.ndarray, ys) -> np.ndarray:
    ys = np.asarray(ys)
    return _unit(np.stack([feats[ys == c].mean(0) for c in range(2)]))


def test_prototypes_embed_pairs_and_templates_as_the_classifier_sees_them(bert, tmp_path):
    data = synthetic("sentiment", n=40)
    support = few_shot(data.split("train"), 4, seed=1, label_names=data.labels)
    texts = list(support.texts)
    pairs = [f"note {i} about it" for i in range(len(texts))]
    paired = replace(support, text_pairs=tuple(pairs))

    def rows(head) -> np.ndarray:
        return head.linear.weight.detach().numpy() * 0.05

    # a pair is the tokenizer's two sequences (as training encodes it), not one joined text
    want = _centroid_rows(
        embed_texts(bert.model, bert.tokenizer, texts, text_pairs=pairs), support.labels
    )
    joined = _centroid_rows(
        embed_texts(
            bert.model, bert.tokenizer, [f"{a} {b}" for a, b in zip(texts, pairs, strict=True)]
        ),
        support.labels,
    )
    assert np.abs(want - joined).max() > 1e-3  # the two encodings do differ
    got = rows(prototype_head(bert, paired, data.labels, prior=0))
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(DataError, match="8 texts but 3 text_pairs"):
        embed_texts(bert.model, bert.tokenizer, texts, text_pairs=pairs[:3])
    # a template formats the examples (pairs included) before they are embedded
    template = "{text} | {text_pair} overall"
    formatted = [f"{a} | {b} overall" for a, b in zip(texts, pairs, strict=True)]
    want = _centroid_rows(embed_texts(bert.model, bert.tokenizer, formatted), support.labels)
    got = rows(prototype_head(bert, paired, data.labels, prior=0, template=template))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # train() builds Prototypes with the template it trains with
    config = TrainConfig(
        max_steps=1, batch_size=8, learning_rate=1e-9, progress=False, patience=None
    )
    plain = data.split("train")
    template = "{text} overall"
    start = Prototypes(support, data.labels, prior=0)
    result = train(
        bert, load_preset("lora"), data, config, tmp_path / "run", template=template,
        head_init=start, train_split=plain,
    )  # fmt: skip
    want = _centroid_rows(
        embed_texts(bert.model, bert.tokenizer, [f"{t} overall" for t in texts]), support.labels
    )
    np.testing.assert_allclose(rows(result.model.head), want, atol=1e-4)
    release(result.model)
    with pytest.raises(ConfigError, match="with template '\\{text\\} here', but training formats"):
        train(
            bert, load_preset("lora"), data, config, tmp_path / "run2", template=template,
            head_init=replace(start, template="{text} here"),
        )  # fmt: skip


def test_a_recipes_prompt_set_describes_the_labels_by_its_descriptions(bert):
    from peftkit.config.recipes import HeadInitSpec
    from peftkit.prompting.templates import load_prompt, load_prompt_set
    from peftkit.run.builders import prototypes_of

    data = synthetic("sentiment", n=20)
    support = few_shot(data.split("train"), 2, label_names=data.labels)

    def rows(head):
        return head.linear.weight.detach().numpy()

    def prototype_start(init):
        return prototypes_of(init, data, support).head(bert.model, bert.tokenizer)

    start = prototype_start(HeadInitSpec(prompt="sentiment"))
    want = prototype_head(bert, support, data.labels, load_prompt_set("sentiment"), prior=2.0)
    np.testing.assert_allclose(rows(start), rows(want), atol=1e-6)
    words = load_prompt("sentiment", "it-was").verbalizer
    start = prototype_start(HeadInitSpec(prompt="sentiment/it-was"))
    np.testing.assert_allclose(
        rows(start), rows(prototype_head(bert, support, data.labels, words)), atol=1e-6
    )
    assert not np.allclose(rows(start), rows(want), atol=1e-3)


# --- contrastive training of the body (training.objective: contrastive) -----------------------


def test_contrastive_pairs_follow_setfits_oversampling():
    from peftkit.training.contrastive import contrastive_pairs

    labels = [0, 0, 0, 1, 1, 2, 2, 2]
    pairs = contrastive_pairs(labels, seed=3)
    every = {(i, j) for i in range(8) for j in range(i, 8)}  # a text with itself included
    pos = {(i, j) for i, j in every if labels[i] == labels[j]}
    neg = every - pos
    assert len(pos) == 6 + 3 + 6 and len(neg) == 21
    # positives and negatives alternate, each group as large as the larger one (21 here)
    assert [t for _, _, t in pairs] == [1.0, 0.0] * 21
    assert {(i, j) for i, j, t in pairs if t == 0.0} == neg  # every negative once
    positives = [(i, j) for i, j, t in pairs if t == 1.0]
    assert set(positives) == pos and len(positives) == 21  # cycled to 21
    assert all(labels[i] == labels[j] for i, j in positives)
    assert contrastive_pairs(labels, seed=3) == pairs  # seeded
    assert contrastive_pairs(labels, seed=4) != pairs
    with pytest.raises(DataError, match="at least 2 labels; got 3 rows of 1 label"):
        contrastive_pairs([1, 1, 1])


def test_cosine_pair_loss_is_setfits():
    from peftkit.training.contrastive import cosine_pair_loss

    a, b = torch.randn(5, 7), torch.randn(5, 7)
    t = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(cosine_pair_loss(a, b, t), ((cos - t) ** 2).mean())


def _pair_loss(model, tokenizer, texts, pairs) -> float:
    """The cosine pair loss over ``pairs``, dropout off (what training lowers)."""
    from peftkit.training.contrastive import cosine_pair_loss

    x = torch.as_tensor(embed_texts(model.body, tokenizer, texts))
    i, j, t = (torch.tensor(v) for v in zip(*pairs, strict=True))
    return float(cosine_pair_loss(x[i], x[j], t.float()))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_contrastive_training_trains_the_body_and_rebuilds_the_head(bert, tmp_path, method):
    from peftkit.data.load import TextDataset
    from peftkit.training.contrastive import contrastive_pairs
    from peftkit.training.prototypes import Prototypes

    data = synthetic("sentiment", n=40)
    support = few_shot(data.split("train"), 4, seed=0, label_names=data.labels)
    few = TextDataset("few", data.labels, {"train": support, "test": data.split("test")})
    protos = Prototypes(support, data.labels, DESCRIPTIONS)
    start = protos.head(bert.model, bert.tokenizer)
    pairs = contrastive_pairs(support.labels, seed=0)
    texts = list(support.texts)
    before_body = {n: p.detach().clone() for n, p in bert.model.named_parameters()}
    config = TrainConfig(
        objective="contrastive", epochs=4, batch_size=4, progress=False, patience=None,
        learning_rate=3e-2 if method == "lora" else 3e-3, log_every=1,
    )  # fmt: skip
    result = train(bert, load_preset(method), few, config, tmp_path / "run", head_init=protos)
    model = result.model
    assert result.steps == 4 * len(pairs) // 4  # one epoch is every pair once
    assert all(r["loss"] >= 0 for r in result.history if "loss" in r)
    # the head was not trained but rebuilt: it is the prototype head of the trained body
    assert not any(p.requires_grad for p in model.head.parameters())
    rebuilt = protos.head(model, bert.tokenizer)
    torch.testing.assert_close(model.head.linear.weight, rebuilt.linear.weight)
    assert not torch.allclose(model.head.linear.weight, start.linear.weight, atol=1e-3)
    # the body learnt the pairs: same-label texts closer, others apart
    untouched = SimpleNamespace(body=bert.model)
    if method == "lora":
        with model.body.disable_adapter():
            loss_before = _pair_loss(untouched, bert.tokenizer, texts, pairs)
    else:
        loss_before = _pair_loss(untouched, bert.tokenizer, texts, pairs)
    loss_after = _pair_loss(model, bert.tokenizer, texts, pairs)
    assert loss_after < 0.75 * loss_before
    assert result.test_metrics["accuracy"] >= 0.0 and result.report is not None
    release(model)
    for n, p in bert.model.named_parameters():  # the shared base is as it was
        torch.testing.assert_close(p, before_body[n])


def test_contrastive_training_needs_prototypes_and_a_body(bert, tmp_path):
    from peftkit.data.load import TextDataset
    from peftkit.training.prototypes import Prototypes

    data = synthetic("sentiment", n=20)
    support = few_shot(data.split("train"), 2, label_names=data.labels)
    few = TextDataset("few", data.labels, {"train": support})
    config = TrainConfig(objective="contrastive", max_steps=1, progress=False)
    head = prototype_head(bert, support, data.labels)
    with pytest.raises(
        ConfigError, match="needs adapter.head_init: prototypes.*lora, head_init Head"
    ):
        train(bert, load_preset("lora"), few, config, tmp_path / "a", head_init=head)
    protos = Prototypes(support, data.labels)
    with pytest.raises(ConfigError, match="adapter that trains the body.*probe"):
        train(bert, load_preset("probe"), few, config, tmp_path / "b", head_init=protos)
    wrong = Prototypes(support, ("no", "yes"))
    with pytest.raises(ConfigError, match=r"prototypes are for labels \['no', 'yes'\]"):
        train(bert, load_preset("lora"), few, config, tmp_path / "c", head_init=wrong)
    with pytest.raises(ConfigError, match="mean-pooled embeddings, but this model pools 'cls'"):
        cls = replace(load_preset("lora"), pooling="cls")
        train(bert, cls, few, config, tmp_path / "d", head_init=protos)
    with pytest.raises(ConfigError, match="training.objective='pairs'; use one of classify"):
        TrainConfig(objective="pairs")
    with pytest.raises(ConfigError, match="prior must be >= 0"):
        Prototypes(support, data.labels, prior=-1)


def test_an_interrupted_contrastive_run_resumes_to_the_same_weights(bert, tmp_path, monkeypatch):
    import peftkit.training.loop as loop_mod
    from peftkit.data.load import TextDataset
    from peftkit.training.checkpoints import trainable_state
    from peftkit.training.prototypes import Prototypes

    data = synthetic("sentiment", n=40)
    support = few_shot(data.split("train"), 3, seed=2, label_names=data.labels)
    few = TextDataset("few", data.labels, {"train": support, "test": data.split("test")})
    protos = Prototypes(support, data.labels)
    config = TrainConfig(
        objective="contrastive", epochs=2, batch_size=4, learning_rate=3e-2, progress=False,
        patience=None, checkpoint_every=3,
    )  # fmt: skip

    def run(folder):
        result = train(bert, load_preset("lora"), few, config, folder, head_init=protos)
        weights = {k: v.clone() for k, v in trainable_state(result.model).items()}
        head = result.model.head.linear.weight.detach().clone()
        release(result.model)
        return result, weights, head

    straight, want, want_head = run(tmp_path / "straight")
    real, calls = loop_mod.cosine_pair_loss, {"n": 0}

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(loop_mod, "cosine_pair_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    monkeypatch.setattr(loop_mod, "cosine_pair_loss", real)
    resumed, got, got_head = run(tmp_path / "cut")
    assert resumed.resumed_from == 6 and resumed.steps == straight.steps > 8
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_head, want_head, atol=1e-4, rtol=1e-4)
