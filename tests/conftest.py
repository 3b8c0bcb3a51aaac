"""Shared fixtures: tiny models built from configs (hidden 32, 2 layers) and saved as folders,
so that every test goes through the same ``load_base`` path a user's local model takes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models are all thread overhead: one thread is several times faster, and it keeps
# the suite fast when the machine is shared. Child processes inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

WORDS = (
    "the a an is was this that it movie film great good bad awful terrible fine "
    "love hate boring fun sport game team win lose market stock price company "
    "money bank card transfer account politics election vote government music film "
    "tech computer phone software free prize call now text win cash hello ok yes no "
    "positive negative neutral question answer sentence topic news about what who "
    "where when how why number person place thing description abbreviation spam ham"
).split()


def make_tokenizer(style: str):
    """A word-level fast tokenizer over WORDS; ``style`` is ``"bert"`` or ``"causal"``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=64,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=64,
    )


def build_tiny(family: str, folder: Path) -> Path:
    """Save a tiny random model of ``family`` (bert | llama | gpt2) with its tokenizer."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    style = "bert" if family == "bert" else "causal"
    tokenizer = make_tokenizer(style)
    vocab = len(tokenizer)
    if family == "bert":
        config = tf.BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        model = tf.BertModel(config, add_pooling_layer=False)
    elif family == "llama":
        config = tf.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=5,
            eos_token_id=6,
        )
        model = tf.LlamaForCausalLM(config)
    elif family == "gpt2":
        config = tf.GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            pad_token_id=0,
            bos_token_id=5,
            eos_token_id=6,
        )
        model = tf.GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny bert / llama / gpt2 models, built once per test session."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {fam: build_tiny(fam, root / fam) for fam in ("bert", "llama", "gpt2")}


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    return cache


@pytest.fixture()
def reset_accelerate():
    """AcceleratorState is process-global: reset it around tests that create one."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
