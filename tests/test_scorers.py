"""Scorers and calibration on tiny random models built from configs.

The key check: the shared-prefix causal scorer (one forward per prompt, cached prefix for
every label continuation) gives the same log-probs as one forward per (prompt, label).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from peftkit.errors import ConfigError, DataError, ModelError
from peftkit.metrics.report import expected_calibration_error
from peftkit.prompting.calibration import (
    calibration_report,
    content_free_probs,
    contextual_calibration,
    domain_pmi,
)
from peftkit.prompting.scorers import (
    capabilities,
    causal_encoder,
    causal_strategy,
    continuation_logprobs,
    embed_texts,
    naive_continuation_logprobs,
    packing,
    score_causal,
    score_embedding,
    score_masked_lm,
    score_nli,
    strategies,
)
from peftkit.prompting.scorers.common import continuation_ids
from peftkit.prompting.scorers.label_tree import LabelTree
from peftkit.prompting.templates import Prompt, Template, Verbalizer

WORDS = [
    "the",
    "a",
    "is",
    "was",
    "it",
    "this",
    "movie",
    "film",
    "good",
    "bad",
    "great",
    "awful",
    "very",
    "not",
    "at",
    "all",
    "fun",
    "boring",
    "review",
    "sentiment",
    "question",
    "answer",
    "positive",
    "negative",
    "yes",
    "no",
    "plot",
    "actors",
    "music",
    "long",
    "story",
    "really",
    "and",
    "but",
    "so",
    "of",
    "to",
    "example",
    "entailment",
    ",",
    ".",
    ":",
    "?",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
CONTEXT = 48


def make_tokenizer(style: str) -> tf.PreTrainedTokenizerFast:
    """Word-level: "bos" adds <s> in front (Llama-like), "plain" adds nothing (GPT-2-like),
    "bert" wraps in [CLS] ... [SEP]. Accents are stripped, so "\u0301" encodes to nothing."""
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "bos":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    elif style == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=CONTEXT,
    )


def make_causal(family: str, sliding_window: int | None = None):
    """A tiny llama or GPT-2, a Mistral attending to a ``sliding_window`` of the past, or a
    Bloom or MPT (ALiBi: positions from the mask, no ``position_ids``)."""
    torch.manual_seed(0)
    n = len(SPECIALS) + len(set(WORDS))
    if family == "bloom":
        config = tf.BloomConfig(vocab_size=n, hidden_size=32, n_layer=2, n_head=2)
        return tf.BloomForCausalLM(config).eval(), make_tokenizer("plain")
    if family == "mpt":
        config = tf.MptConfig(vocab_size=n, d_model=32, n_layers=2, n_heads=2, max_seq_len=CONTEXT)
        return tf.MptForCausalLM(config).eval(), make_tokenizer("plain")
    if family in ("llama", "mistral"):
        shape = dict(
            vocab_size=n,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=CONTEXT,
            pad_token_id=0,
            bos_token_id=5,
            eos_token_id=6,
        )
        if family == "mistral":
            config = tf.MistralConfig(sliding_window=sliding_window, **shape)
            return tf.MistralForCausalLM(config).eval(), make_tokenizer("bos")
        return tf.LlamaForCausalLM(tf.LlamaConfig(**shape)).eval(), make_tokenizer("bos")
    config = tf.GPT2Config(
        vocab_size=n,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=CONTEXT,
        pad_token_id=0,
        bos_token_id=5,
        eos_token_id=6,
    )
    return tf.GPT2LMHeadModel(config).eval(), make_tokenizer("plain")


def make_bert(head: str):
    torch.manual_seed(0)
    n = len(SPECIALS) + len(set(WORDS))
    config = tf.BertConfig(
        vocab_size=n,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=CONTEXT,
    )
    if head == "nli":
        config.id2label = {0: "entailment", 1: "neutral", 2: "contradiction"}
        config.label2id = {v: k for k, v in config.id2label.items()}
        model = tf.BertForSequenceClassification(config)
    elif head == "mlm":
        model = tf.BertForMaskedLM(config)
    else:
        model = tf.BertModel(config, add_pooling_layer=False)
    return model.eval(), make_tokenizer("bert")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def causal(request):
    return make_causal(request.param)


PROMPTS = [
    "the movie was good",
    "review : this film is really boring and the plot is not fun at all so",
    "it",
    "a long story of actors and music , but the film is very long",
    "question : was it good ? answer :",
]
CONTINUATIONS = {
    "single": [" good", " bad", " great"],
    "multi": [" very good", " not good at all", " really bad"],
    "mixed": [" good", " not very good", " bad", " yes it was"],
    "one-multi": [" good", " bad", " not very good"],  # scored in the prompt's own forward
    # labels that start with the same words (and one that is another's start): the label
    # tree feeds " not" and " very" once for all the labels through them
    "shared-words": [" not good", " not bad at all", " not", " very good", " very good indeed"],
}


# --- the key test: shared prefix == one forward per (prompt, label) ----------------------


@pytest.fixture(params=["packed", "padded"])
def multi_way(request):
    """Prompts packed into rows with the label tree after each (a 4-D mask), or (what an
    attention that takes no custom mask gets) left-padded rows, the longest label inline and
    the other multi-token labels continuing the prompt's cache."""
    return request.param


@pytest.mark.parametrize("kind", sorted(CONTINUATIONS))
@pytest.mark.parametrize("batch_size, max_rows", [(2, 3), (5, 256)])
def test_shared_prefix_matches_naive(causal, kind, batch_size, max_rows, multi_way):
    model, tok = causal
    conts = CONTINUATIONS[kind]
    fast = continuation_logprobs(
        model, tok, PROMPTS, conts, batch_size=batch_size, max_rows=max_rows, strategy=multi_way
    )
    naive = naive_continuation_logprobs(model, tok, PROMPTS, conts, batch_size=1)
    assert causal_strategy(model, tok, PROMPTS, conts) == "packed"  # what auto takes here
    assert fast.shape == (len(PROMPTS), len(conts))
    assert np.all(fast < 0)
    np.testing.assert_allclose(fast, naive, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["multi", "mixed", "shared-words"])
def test_the_label_tree_scores_every_label_in_one_forward(causal, kind, monkeypatch):
    """With several multi-token labels the prompts' packed forwards are the only ones: no
    cache is continued; a small logits budget splits forwards, same scores."""
    model, tok = causal
    conts = CONTINUATIONS[kind]
    expected = _by_hand(model, tok, PROMPTS, conts)

    calls = []
    hook = model.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    try:
        got = continuation_logprobs(model, tok, PROMPTS, conts, batch_size=2)
        ids = continuation_ids(tok, conts)
        tree = LabelTree.of_all(ids, "cpu")
        lengths = [len(p) + len(tree.tokens) for p in causal_encoder(tok)(PROMPTS)]
        plan = packing.plan_packing(lengths, 2, len(PROMPTS))
        assert len(calls) == len(plan) <= 3  # 5 prompts, 2 rows a forward: no other forward
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        vocab = model.get_output_embeddings().weight.shape[0]
        monkeypatch.setattr(strategies, "TREE_LOGITS", (len(tree.tokens) + 1) * vocab)  # one row
        calls.clear()
        got = continuation_logprobs(model, tok, PROMPTS, conts, batch_size=4)
        assert len(calls) == len(PROMPTS)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    finally:
        hook.remove()
    # a tree whose one prompt's logits exceed the budget: the other labels continue the cache
    monkeypatch.setattr(strategies, "TREE_LOGITS", (len(tree.tokens) + 1) * vocab - 1)
    assert causal_strategy(model, tok, PROMPTS, conts) == "padded"
    got = continuation_logprobs(model, tok, PROMPTS, conts, batch_size=2)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    with pytest.raises(ModelError, match="'packed' cannot score.*label tree needs more than"):
        continuation_logprobs(model, tok, PROMPTS, conts, strategy="packed")
    if kind == "shared-words":  # " not" and " very" fed once each: 5 tokens, not 1+3+1+2
        assert len(tree.tokens) == 5


@pytest.mark.parametrize(
    "lengths, rows, most",
    [([10, 5, 5, 4], 2, 100), ([9, 9, 9], 2, 100), ([3, 7, 1, 1, 1, 6, 2], 1, 2), ([4], 8, 1)],
)
def test_the_packing_plan_places_every_prompt_once_within_its_forward(lengths, rows, most):
    plan = packing.plan_packing(lengths, rows, most)
    placed = [i for forward in plan for row in forward for i in row]
    assert sorted(placed) == list(range(len(lengths)))
    for forward in plan:
        width = max(lengths[i] for row in forward for i in row)
        assert 1 <= len(forward) <= rows and sum(map(len, forward)) <= most
        assert all(sum(lengths[i] for i in row) <= width for row in forward)
    if lengths == [10, 5, 5, 4]:  # the two 5s share the second row of the first forward
        assert plan == [[[0], [1, 2]], [[3]]]


def test_the_packing_plan_keeps_each_mask_within_its_budget(monkeypatch):
    """Long prompts get fewer rows a forward: the mask's (query, key) cells, the shared
    start's keys counted, stay within MASK_CELLS (one row at the least)."""
    plan = packing.plan_packing
    monkeypatch.setattr(packing, "MASK_CELLS", 10 * (10 + 5) * 2)  # two rows of 10, 5 shared
    assert plan([10, 10, 10, 3], 8, 100, shared=5) == [[[0], [1]], [[2], [3]]]
    assert plan([10, 10, 10], 8, 100, shared=0) == [[[0], [1], [2]]]
    monkeypatch.setattr(packing, "MASK_CELLS", 1)
    assert plan([10, 10], 8, 100) == [[[0]], [[1]]]


@pytest.mark.parametrize("kind", ["single", "shared-words"])
def test_short_prompts_share_a_row_and_score_as_alone(causal, kind, monkeypatch):
    """Prompts much shorter than the longest are packed end to end in one row: fewer rows
    than prompts are fed, and every score is still that prompt's own. The LM head runs only
    at the kept positions; if it ran at every one, the kept ones are picked out after."""
    model, tok = causal
    prompts = [PROMPTS[1], "it", "the movie", "a film", "good"]
    conts = CONTINUATIONS[kind]
    expected = _by_hand(model, tok, prompts, conts)
    fed = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: fed.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        got = continuation_logprobs(model, tok, prompts, conts, batch_size=2)
        assert sum(rows for rows, _ in fed) < len(prompts)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        head = []
        handle = model.get_output_embeddings().register_forward_hook(
            lambda _m, _a, out: head.append(out.shape[:2])
        )
        try:
            continuation_logprobs(model, tok, prompts, conts, batch_size=2)
        finally:
            handle.remove()
        n_tree = len(LabelTree.of_all(continuation_ids(tok, conts), "cpu").tokens)
        assert sum(kept for _, kept in head) == len(prompts) * (1 + n_tree)
        monkeypatch.setattr(strategies, "head_at", lambda *_a: contextlib.nullcontext([]))
        got = continuation_logprobs(model, tok, prompts, conts, batch_size=2)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    finally:
        hook.remove()


SHARED = "review : this movie was good and the plot was fun . "  # 12 tokens before each prompt


@pytest.mark.parametrize("kind", sorted(CONTINUATIONS))
@pytest.mark.parametrize("batch_size, max_rows", [(2, 3), (5, 256)])
def test_prompts_sharing_their_first_tokens_run_them_once(
    causal, kind, batch_size, max_rows, multi_way
):
    """Demonstrations or an instruction common to every prompt: same scores, computed once."""
    model, tok = causal
    prompts = [SHARED + p for p in PROMPTS]
    ids = causal_encoder(tok)(prompts)
    assert strategies.shared_length(model, ids) >= 12  # the shared path is the one under test
    conts = CONTINUATIONS[kind]
    fast = continuation_logprobs(
        model, tok, prompts, conts, batch_size=batch_size, max_rows=max_rows, strategy=multi_way
    )
    naive = naive_continuation_logprobs(model, tok, prompts, conts, batch_size=1)
    np.testing.assert_allclose(fast, naive, atol=1e-4, rtol=0)
    if kind != "mixed":
        return
    # a LoRA-wrapped model shares too; a prefix-tuned one brings its own cache and does not
    import copy

    import peft

    for method in ("lora", "prefix"):
        wrapped = peft.get_peft_model(copy.deepcopy(model), _peft_config(method)).eval()
        assert (strategies.shared_length(wrapped, ids) > 0) == (method == "lora")
        np.testing.assert_allclose(
            continuation_logprobs(wrapped, tok, prompts, conts, batch_size=batch_size),
            _by_hand(wrapped, tok, prompts, conts),
            atol=1e-4,
            rtol=0,
        )


@pytest.mark.parametrize("kind", sorted(CONTINUATIONS))
def test_a_sliding_window_model_scores_as_its_own_forward(kind, monkeypatch):
    """Rebuilt caches see the whole past: prompts longer than the window must not use them."""
    model, tok = make_causal("mistral", sliding_window=6)
    assert capabilities.attention_window(model) == 6
    conts = CONTINUATIONS[kind]
    for prompts in (PROMPTS, [SHARED + p for p in PROMPTS]):
        got = continuation_logprobs(model, tok, prompts, conts, batch_size=2, max_rows=3)
        np.testing.assert_allclose(got, _by_hand(model, tok, prompts, conts), atol=1e-4, rtol=0)
    # a window longer than every prompt changes nothing: the shared cache is used as before,
    # and several multi-token labels go in the prompt's forward as a tree
    wide, tok = make_causal("mistral", sliding_window=CONTEXT)
    prompts = [SHARED + p for p in PROMPTS]

    assert causal_strategy(wide, tok, prompts, conts) == "packed"
    got = continuation_logprobs(wide, tok, prompts, conts, batch_size=2)
    np.testing.assert_allclose(got, _by_hand(wide, tok, prompts, conts), atol=1e-4, rtol=0)
    assert capabilities.attention_window(make_causal("llama")[0]) is None


@pytest.mark.parametrize("family", ["bloom", "mpt"])
@pytest.mark.parametrize("kind", sorted(CONTINUATIONS))
def test_alibi_models_without_position_ids_score_as_their_own_forward(family, kind):
    """Bloom and MPT take no ``position_ids`` (ALiBi, from the mask): packed rows and label
    trees would misplace their tokens (Bloom raised, MPT scored 1e-3 off), so they take the
    left-padded way, the labels contiguous after each prompt."""
    model, tok = make_causal(family)
    assert not capabilities.takes_custom_masks(model)
    assert causal_strategy(model, tok, PROMPTS, CONTINUATIONS[kind]) == "padded"
    with pytest.raises(ModelError, match="'packed' cannot score.*no 4-D mask"):
        continuation_logprobs(model, tok, PROMPTS, CONTINUATIONS[kind], strategy="packed")
    for prompts in (PROMPTS, [SHARED + p for p in PROMPTS]):
        got = continuation_logprobs(model, tok, prompts, CONTINUATIONS[kind], batch_size=2)
        expected = _by_hand(model, tok, prompts, CONTINUATIONS[kind])
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_a_label_tree_longer_than_the_context_at_the_context_edge(causal, monkeypatch):
    """Prompts that fill the context but for the longest label: the tree's branches make the
    fed sequence longer than ``max_position_embeddings``, yet each branch's positions stay
    inside it, so the scores are those of one forward per (prompt, label)."""
    model, tok = causal
    conts = CONTINUATIONS["shared-words"]
    ids = continuation_ids(tok, conts)
    tree = LabelTree.of_all(ids, "cpu")
    words = "the movie was good and the plot was fun so".split()
    room = CONTEXT - max(map(len, ids))
    encode = causal_encoder(tok)
    prompts = []
    for shift in range(3):  # three lengths, the longest at the edge: padded batches
        n = 1
        while len(encode([_words(words, n + 1)])[0]) <= room - shift:
            n += 1
        prompts.append(_words(words, n))
    lengths = [len(p) for p in encode(prompts)]
    assert max(lengths) == room and max(lengths) + len(tree.tokens) > CONTEXT

    assert causal_strategy(model, tok, prompts, conts) == "packed"
    got = continuation_logprobs(model, tok, prompts, conts, batch_size=3)
    np.testing.assert_allclose(got, _by_hand(model, tok, prompts, conts), atol=1e-4, rtol=0)


def _words(words: list[str], n: int) -> str:
    return " ".join((words * (n // len(words) + 1))[:n])


def test_naive_batched_with_padding_matches_unbatched(causal):
    model, tok = causal
    conts = CONTINUATIONS["mixed"]
    one = naive_continuation_logprobs(model, tok, PROMPTS, conts, batch_size=1)
    many = naive_continuation_logprobs(model, tok, PROMPTS, conts, batch_size=7)
    np.testing.assert_allclose(one, many, atol=1e-4, rtol=0)


def _peft_config(method: str):
    import peft

    if method == "lora":
        return peft.LoraConfig(r=2, task_type="CAUSAL_LM", init_lora_weights=False)
    cls = peft.PrefixTuningConfig if method == "prefix" else peft.PromptTuningConfig
    return cls(num_virtual_tokens=3, task_type="CAUSAL_LM")


def _by_hand(model, tok, prompts, conts) -> np.ndarray:
    """log P(cont | prompt): one unpadded forward of each pair, the last positions read."""
    ids, cont_ids = causal_encoder(tok)(list(prompts)), continuation_ids(tok, conts)
    out = np.zeros((len(ids), len(cont_ids)))
    with torch.no_grad():
        for i, p in enumerate(ids):
            for j, c in enumerate(cont_ids):
                logp = model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
                at = logp.shape[0] - len(c) - 1  # virtual tokens, if any, come first
                out[i, j] = sum(logp[at + t, tok_id].item() for t, tok_id in enumerate(c))
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_scores_of_a_peft_wrapped_causal_lm(kind, method):
    """LoRA, prefix and prompt tuning: batched, padded scores equal one pair at a time.

    Prompt tuning puts virtual tokens before the input and peft drops position ids for it,
    so the scorer takes the one-forward-per-pair way there; the others share the prefix.
    """
    import peft

    model, tok = make_causal(kind)
    conts = CONTINUATIONS["mixed"]
    plain = continuation_logprobs(model, tok, PROMPTS, conts, batch_size=2)
    wrapped = peft.get_peft_model(model, _peft_config(method)).eval()
    if method == "prompt":
        with torch.no_grad():  # peft's random init is tiny; make the prompt matter
            wrapped.prompt_encoder.default.embedding.weight.normal_(0, 1.0)
    fast = continuation_logprobs(wrapped, tok, PROMPTS, conts, batch_size=2, max_rows=3)
    np.testing.assert_allclose(fast, _by_hand(wrapped, tok, PROMPTS, conts), atol=1e-4, rtol=0)
    assert np.abs(fast - plain).max() > 1e-2  # the adapter changes the scores


def test_bos_is_part_of_the_prompt():
    model, tok = make_causal("llama")
    with_bos = continuation_logprobs(model, tok, ["the movie"], [" good"])
    ids = tok("the movie good", add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([[tok.bos_token_id, *ids]])).logits
    expected = logits[0, -2].log_softmax(-1)[ids[-1]].item()
    assert with_bos[0, 0] == pytest.approx(expected, abs=1e-5)


# --- score_causal: normalizations, labels, truncation, bad input ---------------------------

VERB = Verbalizer.from_dict({"negative": [" bad", " not good at all"], "positive": " very good"})
PROMPT = Prompt(Template("review : {text} . sentiment :", name="t"), VERB)


def test_score_causal_normalizations_match_reference(causal):
    model, tok = causal
    texts = PROMPTS[:3]
    rendered = [PROMPT.template.render({"text": t}) for t in texts]
    phrases = [" bad", " not good at all", " very good"]
    ref = naive_continuation_logprobs(model, tok, rendered, phrases)
    lengths = np.array([1, 4, 2])

    def lse(a, b):
        return np.logaddexp(a, b)

    got = score_causal(model, tok, PROMPT, texts, batch_size=2)
    assert got.labels == ("negative", "positive")
    np.testing.assert_allclose(got.logprobs[:, 0], lse(ref[:, 0], ref[:, 1]), atol=1e-4)
    np.testing.assert_allclose(got.logprobs[:, 1], ref[:, 2], atol=1e-4)

    mean = score_causal(model, tok, PROMPT, texts, normalize="mean", aggregate="max")
    per = ref / lengths
    np.testing.assert_allclose(mean.logprobs[:, 0], per[:, :2].max(1), atol=1e-4)

    pmi = score_causal(model, tok, PROMPT, texts, normalize="pmi")
    assert PROMPT.template.domain_prompt() == ". sentiment :"
    dom = naive_continuation_logprobs(model, tok, [". sentiment :"], phrases)
    expected = lse(ref[:, 0], ref[:, 1]) - lse(dom[:, 0], dom[:, 1])
    np.testing.assert_allclose(pmi.logprobs[:, 0], expected, atol=1e-4)
    assert got.predictions.tolist() == np.argmax(got.logprobs, 1).tolist()
    np.testing.assert_allclose(got.probs.sum(1), 1.0)


def test_labels_order_the_columns_and_must_be_covered(causal):
    model, tok = causal
    a = score_causal(model, tok, PROMPT, PROMPTS[:2])
    b = score_causal(model, tok, PROMPT, PROMPTS[:2], labels=["positive", "negative"])
    assert b.labels == ("positive", "negative")
    np.testing.assert_allclose(a.logprobs[:, ::-1], b.logprobs)
    with pytest.raises(DataError, match="neutral"):
        score_causal(model, tok, PROMPT, PROMPTS[:2], labels=["negative", "neutral"])


def test_long_input_is_cut_never_the_label_words(causal, caplog):
    model, tok = causal
    long_text = " ".join(["the film was very long and boring"] * 30)
    scores = score_causal(model, tok, PROMPT, [long_text, "good fun"], batch_size=2)
    assert scores.truncated == 1
    assert np.all(np.isfinite(scores.logprobs))
    assert "1 of 2 inputs were cut" in caplog.text
    short = score_causal(model, tok, PROMPT, ["good fun"])
    np.testing.assert_allclose(scores.logprobs[1], short.logprobs[0], atol=1e-4)


def test_label_words_that_tokenize_to_nothing(causal):
    model, tok = causal
    verb = Verbalizer.from_dict({"negative": " bad", "positive": "\u0301"})
    with pytest.raises(ConfigError, match="positive.*tokenize to nothing|tokenize to nothing"):
        score_causal(model, tok, Prompt(PROMPT.template, verb), ["good"])


def test_template_field_the_data_lacks(causal):
    model, tok = causal
    pair = Prompt(Template("{text} ? {text_pair} :", name="nli-ish"), VERB)
    with pytest.raises(DataError, match=r"text_pair.*only: text"):
        score_causal(model, tok, pair, ["good"])
    ok = score_causal(model, tok, pair, ["good"], text_pairs=["bad"])
    assert ok.logprobs.shape == (1, 2)


def test_bad_options(causal):
    model, tok = causal
    with pytest.raises(ConfigError, match="normalize"):
        score_causal(model, tok, PROMPT, ["good"], normalize="softmax")
    with pytest.raises(ConfigError, match="batch_size must be >= 1; got 0"):
        score_causal(model, tok, PROMPT, ["good"], batch_size=0)
    mlm = Prompt(Template("{text} it was {mask}", name="m"), VERB)
    with pytest.raises(ConfigError, match="score_masked_lm"):
        score_causal(model, tok, mlm, ["good"])


# --- encoders -------------------------------------------------------------------------------


def test_embedding_scorer():
    model, tok = make_bert("plain")
    verb = Verbalizer.from_dict({"neg": "awful boring", "pos": "good fun"})
    texts = ["good fun", "awful boring", "the plot"]
    scores = score_embedding(model, tok, texts, verb, temperature=0.1)
    np.testing.assert_allclose(scores.probs.sum(1), 1.0)
    assert scores.predicted_labels[:2] == ["pos", "neg"]  # identical text: cosine 1
    vecs = embed_texts(model, tok, texts)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-6)
    sharp = score_embedding(model, tok, texts, verb, temperature=0.01)
    assert sharp.probs.max(1)[0] > scores.probs.max(1)[0]
    with pytest.raises(ConfigError, match="temperature"):
        score_embedding(model, tok, texts, verb, temperature=0)


def test_nli_scorer_uses_entailment_logit():
    model, tok = make_bert("nli")
    verb = Verbalizer.from_dict({"neg": "bad", "pos": "good"})
    scores = score_nli(model, tok, ["the film was fun", "boring"], verb)
    enc = tok(
        ["the film was fun"] * 2,
        ["This example is bad.", "This example is good."],
        padding=True,
        return_tensors="pt",
    )
    entail = model(**enc).logits[:, 0].detach().numpy()
    expected = entail - np.logaddexp(entail[0], entail[1])
    np.testing.assert_allclose(scores.logprobs[0], expected, atol=1e-5)
    model.config.id2label = {0: "yes", 1: "no"}
    with pytest.raises(ModelError, match="entailment"):
        score_nli(model, tok, ["x"], verb)


def test_masked_lm_scorer_scores_words_at_the_mask():
    model, tok = make_bert("mlm")
    verb = Verbalizer.from_dict({"neg": " bad", "pos": " very good"})
    prompt = Prompt(Template("{text} it was {mask} .", name="m"), verb)
    scores = score_masked_lm(model, tok, prompt, ["the film"])
    ids = tok.convert_tokens_to_ids
    one = tok("the film it was [MASK] .", return_tensors="pt")
    logp = model(**one).logits[0].log_softmax(-1)
    pos = (one["input_ids"][0] == tok.mask_token_id).nonzero()[0, 0]
    assert scores.logprobs[0, 0] == pytest.approx(logp[pos, ids("bad")].item(), abs=1e-5)
    two = tok("the film it was [MASK][MASK] .", return_tensors="pt")
    logp = model(**two).logits[0].log_softmax(-1)
    p = (two["input_ids"][0] == tok.mask_token_id).nonzero()[:, 0]
    expected = logp[p[0], ids("very")] + logp[p[1], ids("good")]
    assert scores.logprobs[0, 1] == pytest.approx(expected.item(), abs=1e-5)
    literal = Prompt(Template("{text} it was [MASK] .", name="lit"), verb)
    np.testing.assert_allclose(
        score_masked_lm(model, tok, literal, ["the film"]).logprobs, scores.logprobs, atol=1e-6
    )
    with pytest.raises(ConfigError, match="no mask"):
        score_masked_lm(model, tok, Prompt(Template("{text} it was", name="x"), verb), ["a"])


# --- calibration ------------------------------------------------------------------------------


def test_contextual_calibration_is_identity_for_uniform_p_cf():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=20)
    np.testing.assert_allclose(contextual_calibration(probs, np.full(4, 0.25)), probs)
    np.testing.assert_allclose(contextual_calibration(probs, np.full(4, 0.7)), probs)


def test_contextual_calibration_removes_a_constant_bias():
    true = np.array([[0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    bias = np.array([0.9, 0.1])
    biased = true * bias / (true * bias).sum(1, keepdims=True)
    assert biased.argmax(1).tolist() == [0, 0, 0]
    fixed = contextual_calibration(biased, bias)
    np.testing.assert_allclose(fixed, true, atol=1e-12)
    with pytest.raises(DataError, match="labels"):
        contextual_calibration(biased, np.array([0.5, 0.3, 0.2]))


def test_content_free_probs_and_report(causal):
    model, tok = causal
    seen = []

    def score(texts):
        seen.extend(texts)
        return score_causal(model, tok, PROMPT, texts).probs

    p_cf = content_free_probs(score)
    assert seen == ["N/A", "", "[MASK]"]
    assert p_cf.shape == (2,) and p_cf.sum() == pytest.approx(1.0)
    before = score(PROMPTS)
    after = contextual_calibration(before, p_cf)
    gold = [1, 0, 1, 0, 1]
    report = calibration_report(gold, before, after, labels=["negative", "positive"])
    assert set(report) == {"before", "after"}
    acc = float(np.mean(after.argmax(1) == np.array(gold)))
    assert report["after"]["accuracy"] == pytest.approx(acc)
    assert report["before"]["ece"] == pytest.approx(expected_calibration_error(before, gold))
    assert 0.0 <= report["after"]["macro_f1"] <= 1.0


def test_domain_pmi_subtracts_the_domain_scores():
    cond = np.log(np.array([[0.6, 0.4], [0.3, 0.7]]))
    got = domain_pmi(cond, np.log(np.array([[0.8, 0.2]])))
    np.testing.assert_allclose(got, cond - np.log([[0.8, 0.2]]))
    assert got.argmax(1).tolist() == [1, 1]


def test_few_shot_demos_go_before_the_query(causal):
    from peftkit.prompting.demonstrations import Demo

    model, tok = causal
    demos = (Demo("good fun", "positive"), Demo("boring", "negative"))
    got = score_causal(model, tok, PROMPT, ["the plot"], demos=demos)
    text = (
        "review : good fun . sentiment : very good\n\n"
        "review : boring . sentiment : bad\n\n"
        "review : the plot . sentiment :"
    )
    ref = naive_continuation_logprobs(
        model, tok, [text], [" bad", " not good at all", " very good"]
    )
    np.testing.assert_allclose(got.logprobs[0, 1], ref[0, 2], atol=1e-4)


def test_a_cut_prompt_does_not_stop_the_others_sharing_their_demos(causal):
    """One query too long for the context cuts its copy of a demonstration: the other
    prompts still run their whole common start once, and every score is still exact."""
    from peftkit.prompting.demonstrations import Demo, fit_prompts

    model, tok = causal
    fed: list[tuple[int, int]] = []  # (rows, tokens) of each forward of the shared start

    def record(_module, _args, kwargs):
        if kwargs.get("logits_to_keep") == 1:  # the shared start runs alone, one row
            fed.append(tuple(kwargs["input_ids"].shape))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    long_demo = "the movie was really good and the plot was fun and the actors and music was great"
    demos = (Demo(long_demo, "positive"), Demo("boring", "negative"))
    long_query = (
        "a long story of actors and music but the film is very long and boring so it was bad"
    )
    texts = ["the plot", long_query, "it was fun", "not good at all"]
    try:
        got = score_causal(model, tok, PROMPT, texts, demos=demos, batch_size=2)
    finally:
        hook.remove()
    assert got.truncated == 1
    budget = CONTEXT - 4  # the longest label, " not good at all", is 4 tokens
    fitted = fit_prompts(tok, PROMPT, texts, budget=budget, demos=demos,
                         encode=causal_encoder(tok))  # fmt: skip
    assert fitted.cut_rows == (1,) and long_demo not in fitted.prompts[1]  # the demo was cut
    # the three uncut prompts shared both demonstrations (not only what the cut one kept)
    demo_tokens = len(causal_encoder(tok)([fitted.prompts[0].rsplit("review", 1)[0]])[0])
    assert fed and fed[0][0] == 1 and fed[0][1] >= demo_tokens - 1
    ref = naive_continuation_logprobs(
        model, tok, list(fitted.prompts), [" bad", " not good at all", " very good"]
    )
    np.testing.assert_allclose(got.logprobs[:, 1], ref[:, 2], atol=1e-4)


def test_pmi_with_an_empty_domain_prompt_uses_bos(causal):
    model, tok = causal
    bare = Prompt(Template("{text}", name="bare"), VERB)
    assert bare.template.domain_prompt() == ""
    pmi = score_causal(model, tok, bare, PROMPTS[:2], normalize="pmi")
    plain = score_causal(model, tok, bare, PROMPTS[:2])
    assert np.all(np.isfinite(pmi.logprobs))
    diff = plain.logprobs - pmi.logprobs  # the domain term: the same for every example
    np.testing.assert_allclose(diff[0], diff[1], atol=1e-6)


def test_the_label_tree_in_bfloat16():
    """The tree's mask takes the hidden states' dtype: a bf16 model scores as its own cache
    continuation does (the way the tree replaced), within bf16's rounding."""
    import copy

    model, tok = make_causal("llama")
    model = copy.deepcopy(model).to(torch.bfloat16)
    conts = CONTINUATIONS["shared-words"]
    tree = continuation_logprobs(model, tok, PROMPTS, conts, batch_size=2, strategy="packed")
    cache = continuation_logprobs(model, tok, PROMPTS, conts, batch_size=2, strategy="padded")
    assert np.isfinite(tree).all()
    np.testing.assert_allclose(tree, cache, atol=0.02, rtol=0)  # a wrong mask: 0.09 off


@pytest.mark.parametrize("strategy", ["packed", "padded", "per-label"])
def test_every_strategy_named_outright_scores_the_same(causal, strategy):
    """``strategy=`` lays the forwards out another way; the scores stay those of "auto"."""
    from peftkit.prompting.demonstrations import Demo

    model, tok = causal
    demos = (Demo("good fun", "positive"), Demo("boring", "negative"))
    auto = score_causal(model, tok, PROMPT, PROMPTS, demos=demos, batch_size=2)
    named = score_causal(model, tok, PROMPT, PROMPTS, demos=demos, batch_size=2, strategy=strategy)
    np.testing.assert_allclose(named.logprobs, auto.logprobs, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="strategy must be one of auto, packed, padded"):
        score_causal(model, tok, PROMPT, PROMPTS, strategy="fast")


def test_a_prompt_tuned_model_takes_one_forward_per_label_and_refuses_the_others(causal):
    import copy

    import peft

    model, tok = causal
    wrapped = peft.get_peft_model(copy.deepcopy(model), _peft_config("prompt")).eval()
    conts = CONTINUATIONS["mixed"]
    assert causal_strategy(wrapped, tok, PROMPTS, conts) == "per-label"
    for strategy in ("packed", "padded"):
        with pytest.raises(ModelError, match="virtual tokens before every input"):
            continuation_logprobs(wrapped, tok, PROMPTS, conts, strategy=strategy)


def test_the_scorer_table_names_functions_that_take_what_it_says():
    """Each row's function imports, reads a prompt or only labels as the row says, and
    takes demonstrations exactly when the row says so; recipes offer the rows they can run."""
    import inspect

    from peftkit.config.recipes import PromptRef
    from peftkit.config.scorers import RECIPE_SCORERS, SCORER_TABLE

    for name, row in SCORER_TABLE.items():
        params = inspect.signature(row.load()).parameters
        assert ("prompt" in params) == (row.reads == "prompt"), name
        assert ("demos" in params) == row.demonstrations, name
    choices = PromptRef.__dataclass_fields__["scorer"].metadata["choices"]
    assert choices == RECIPE_SCORERS and "nli" not in choices and "auto" in choices
