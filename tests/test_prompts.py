"""Templates, verbalizers, the YAML prompt library, and few-shot demonstrations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

from peftkit.config.library import library_dir
from peftkit.errors import ConfigError, DataError
from peftkit.prompting.demonstrations import Demo, fit_prompts, nearest_demos, sample_demos
from peftkit.prompting.templates import (
    Prompt,
    Template,
    Verbalizer,
    available_prompt_sets,
    load_prompt,
    load_prompt_set,
)

LIBRARY = sorted(library_dir("prompts").rglob("*.yaml"))
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# --- the shipped library -------------------------------------------------------------------


def test_library_has_the_families():
    names = set(available_prompt_sets())
    assert {
        "sentiment",
        "news_ag",
        "news_bbc",
        "question_type",
        "intent_banking",
        "spam",
        "emotion",
    } <= names


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.stem)
def test_every_shipped_file_loads_and_renders(path):
    assert path.read_text().startswith("#"), "each file starts with a comment saying what it is"
    prompts = load_prompt_set(path)
    assert len(prompts) >= 3
    for prompt in prompts:
        assert prompt.verbalizer.labels == prompts.labels
        assert prompt.template.fields == ("text",)
        out = prompt.template.render({"text": "SOME TEXT"}, mask="<M>")
        assert "SOME TEXT" in out
        for label in prompts.labels:
            assert all(p.strip() for p in prompt.verbalizer.phrases(label))


def test_lm_eval_sst2_template_is_verbatim():
    prompt = load_prompt("sentiment", "lm-eval-sst2")
    assert (
        prompt.template.text == "{text}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    )
    assert prompt.verbalizer.phrases("negative") == (" negative",)
    assert prompt.verbalizer.phrases("positive") == (" positive",)
    assert prompt.template.render({"text": "fun ."}) == (
        "fun .\nQuestion: Is this sentence positive or negative?\nAnswer:"
    )


@pytest.mark.parametrize(
    "stem, folder",
    [
        ("sentiment", "sst2"),
        ("news_ag", "ag_news"),
        ("question_type", "trec"),
        ("intent_banking", "banking77"),
        ("spam", "sms_spam"),
    ],
)
def test_label_sets_match_the_shared_data(stem, folder):
    labels_file = SHARED / folder / "labels.json"
    if not labels_file.is_file():
        pytest.skip("../shared/data is not here (a user's clone)")
    assert load_prompt_set(stem).labels == tuple(json.loads(labels_file.read_text()))


# --- load errors ---------------------------------------------------------------------------

GOOD = """\
# test prompts
family: toy
labels: [neg, pos]
verbalizer: {neg: " bad", pos: " good"}
templates:
  a: "{text} It was"
  b: {text: "Review: {text}\\nSentiment:", verbalizer: {neg: " no", pos: " yes"}}
"""


def test_a_users_file_works_the_same_way(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(GOOD)
    prompts = load_prompt_set(path)
    assert prompts.names() == ["a", "b"]
    assert load_prompt(str(path), "b").verbalizer.phrases("pos") == (" yes",)
    assert prompts.get("a").template.domain_prompt() == "It was"
    with pytest.raises(ConfigError, match=r"no template 'c'.*templates: a, b"):
        prompts.get("c")


def test_descriptions_describe_the_labels_for_embedding_models(tmp_path):
    path = tmp_path / "mine.yaml"
    plain = load_prompt_set(_write(path, GOOD))
    assert plain.descriptions is None
    assert plain.describe() == plain.get("a").verbalizer  # the first template's words serve
    with pytest.raises(ConfigError, match="no template 'descriptions'; templates: a, b$"):
        plain.get("descriptions")
    text = GOOD.replace(
        "templates:", 'descriptions: {pos: "It was good.", neg: [A, B]}\ntemplates:'
    )
    prompts = load_prompt_set(_write(path, text))
    assert prompts.describe().words == (("neg", ("A", "B")), ("pos", ("It was good.",)))
    assert prompts.names() == ["a", "b"]  # not a template of its own: causal runs skip it
    described = prompts.get("descriptions")
    assert (described.name, described.template.text) == ("descriptions", "{text}")
    assert described.verbalizer is prompts.descriptions
    with pytest.raises(ConfigError, match="templates: a, b, descriptions"):
        prompts.get("c")
    # the shipped sentiment set describes its labels with sentences
    assert load_prompt_set("sentiment").describe().phrases("positive")[0].endswith(".")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (
            ("templates:", "descriptions: {neg: bad, pox: good}\ntemplates:"),
            r"mine.yaml: key 'descriptions': label 'pox' is not one of the file's labels",
        ),
        (
            ("templates:", "descriptions: {neg: bad}\ntemplates:"),
            r"mine.yaml: key 'descriptions': no words for label\(s\) 'pos'",
        ),
        (
            ("templates:", "descriptions: [bad, good]\ntemplates:"),
            r"mine.yaml: key 'descriptions': must be a non-empty mapping",
        ),
        (
            ("verbalizer:", "verbaliser:"),
            r"mine.yaml: unknown key 'verbaliser' \(did you mean 'verbalizer'\?\)",
        ),
        (
            ("{text: ", '{txt: "x", text: '),
            r"template 'b': unknown key 'txt' \(did you mean 'text'\?\)",
        ),
        (
            ('"{text} It was"', '"{txt} It was"'),
            r"mine.yaml: key 'text' of template 'a': unknown field \{txt\}.*did you mean '\{?text",
        ),
        (
            ('pos: " yes"', 'pox: " yes"'),
            r"template 'b', key 'verbalizer': label 'pox' is not one of the file's labels \(neg, pos\) \(did you mean 'pos'\?\)",
        ),
        (('pos: " yes"', 'pos: " no"'), r"template 'b'.*'neg' and 'pos' share the words 'no'"),
        (("family: toy\n", ""), r"mine.yaml: missing key 'family'"),
        ((', pos: " yes"}', "}"), r"template 'b', key 'verbalizer': no words for label\(s\) 'pos'"),
    ],
)
def test_load_errors_name_file_template_and_key(tmp_path, edit, pattern):
    path = tmp_path / "mine.yaml"
    path.write_text(GOOD.replace(*edit))
    with pytest.raises(ConfigError, match=pattern):
        load_prompt_set(path)


def test_yaml_syntax_error_gives_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(GOOD.replace("  a: ", "  a: [\n"))
    with pytest.raises(ConfigError, match=r"broken.yaml, line \d+: invalid YAML"):
        load_prompt_set(path)


def test_unknown_builtin_name_suggests():
    with pytest.raises(ConfigError, match="did you mean 'sentiment'"):
        load_prompt_set("sentimnet")


# --- templates and verbalizers -------------------------------------------------------------


def test_template_fields_render_and_domain():
    t = Template("Premise: {text}\nHypothesis: {text_pair}\n{{literal}} Answer:", name="p")
    assert t.fields == ("text", "text_pair")
    assert (
        t.render({"text": "A {x}", "text_pair": "B"})
        == "Premise: A {x}\nHypothesis: B\n{literal} Answer:"
    )
    assert t.domain_prompt() == "{literal} Answer:"
    assert Template("{text}", domain="Answer:").domain_prompt() == "Answer:"
    with pytest.raises(DataError, match=r"\{text_pair\}.*only: text"):
        t.render({"text": "A"})
    with pytest.raises(ConfigError, match="unknown field"):
        Template("{text:>10}")
    with pytest.raises(ConfigError, match="no {text} field"):
        Template("Answer:")


def test_verbalizer_checks():
    v = Verbalizer.from_dict({"a": [" x", " y z"], "b": " w"})
    assert v.for_labels(["b", "a"]).labels == ("b", "a")
    with pytest.raises(DataError, match="'c'"):
        v.for_labels(["a", "c"])
    with pytest.raises(ConfigError, match="share the words"):
        Verbalizer.from_dict({"a": " same", "b": "Same "})
    with pytest.raises(ConfigError, match="empty word"):
        Verbalizer.from_dict({"a": " ", "b": "w"})


# --- demonstrations --------------------------------------------------------------------------

POOL_TEXTS = [f"text {i}" for i in range(12)]
POOL_LABELS = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 0]
NAMES = ("neg", "neu", "pos")


def test_random_demos_are_reproducible_and_balanced():
    a = sample_demos(POOL_TEXTS, POOL_LABELS, k=2, seed=3, label_names=NAMES)
    b = sample_demos(POOL_TEXTS, POOL_LABELS, k=2, seed=3, label_names=NAMES)
    c = sample_demos(POOL_TEXTS, POOL_LABELS, k=2, seed=4, label_names=NAMES)
    assert a == b and a != c
    assert [d.label for d in a] == ["neg", "neu", "pos"] * 2  # interleaved
    for d in a:
        assert POOL_LABELS[POOL_TEXTS.index(d.text)] == NAMES.index(d.label)
    shuffled = sample_demos(
        POOL_TEXTS, POOL_LABELS, k=2, seed=3, label_names=NAMES, order="shuffle"
    )
    assert sorted(shuffled, key=str) == sorted(a, key=str)


def test_k_larger_than_a_class_has():
    with pytest.raises(DataError, match=r"'pos' has 3.*k <= 3"):
        sample_demos(POOL_TEXTS, POOL_LABELS, k=4, label_names=NAMES)


def test_nearest_demos_pick_the_most_similar_per_class():
    vectors = {t: np.array([1.0, i / 12.0]) for i, t in enumerate(POOL_TEXTS)}
    vectors["q"] = np.array([1.0, 11 / 12.0])

    def embed(texts):
        return np.stack([vectors[t] for t in texts])

    (demos,) = nearest_demos(["q"], POOL_TEXTS, POOL_LABELS, k=1, embed=embed, label_names=NAMES)
    assert {d.text for d in demos} == {"text 11", "text 10", "text 8"}
    assert demos[-1].text == "text 11"  # most similar sits next to the query
    assert nearest_demos(["q"], POOL_TEXTS, POOL_LABELS, 1, embed, label_names=NAMES)[0] == demos


def _tokenizer():
    words = [
        "the",
        "a",
        "film",
        "was",
        "good",
        "bad",
        "great",
        "very",
        "not",
        "it",
        "review",
        "sentiment",
        ":",
        ".",
        "long",
        "boring",
        "yes",
        "no",
    ]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


PROMPT = Prompt(
    Template("review : {text} sentiment :", name="r"),
    Verbalizer.from_dict({"neg": " very bad", "pos": " very good"}),
)


def test_fit_prompts_with_demos_renders_answers():
    tok = _tokenizer()
    demos = (Demo("good film", "pos"), Demo("bad film", "neg"))
    fitted = fit_prompts(tok, PROMPT, ["a film"], demos=demos, budget=100)
    assert fitted.prompts[0] == (
        "review : good film sentiment : very good\n\n"
        "review : bad film sentiment : very bad\n\n"
        "review : a film sentiment :"
    )
    assert fitted.truncated == 0
    assert fitted.ids[0] == tok(fitted.prompts[0])["input_ids"]


def test_fit_prompts_cuts_text_never_label_words():
    tok = _tokenizer()
    long_text = " ".join(["the film was long and boring"] * 10)
    demos = (Demo(long_text, "pos"), Demo("bad", "neg"))
    fitted = fit_prompts(tok, PROMPT, [long_text, "good"], demos=demos, budget=30)
    assert fitted.truncated == 2  # the long demonstration is in both prompts
    for text, ids in zip(fitted.prompts, fitted.ids, strict=True):
        assert len(ids) <= 30
        assert "sentiment : very good\n\n" in text and "sentiment : very bad\n\n" in text
        assert text.endswith("sentiment :")
    assert (
        fitted.prompts
        == fit_prompts(tok, PROMPT, [long_text, "good"], demos=demos, budget=30).prompts
    )
    with pytest.raises(DataError, match="fewer demonstrations"):
        fit_prompts(tok, PROMPT, ["good"], demos=demos * 3, budget=20)
