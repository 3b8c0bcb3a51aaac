"""Rank-stacked mixed-adapter LoRA (peftkit.serving.mixed) against peft's own adapter_names path."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers as tf

from peftkit.serving.mixed import MixedLoRA


def _with_adapters(folder, family: str):
    torch.manual_seed(0)
    model = tf.AutoModel.from_pretrained(folder)
    targets = {
        "bert": (["query", "value"], ["query", "key", "dense"]),
        "llama": (["q_proj", "v_proj"], ["k_proj", "o_proj", "up_proj"]),
        "gpt2": (["c_attn"], ["c_attn", "c_proj"]),
    }[family]
    cfgs = {
        "a": peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets[0]),
        "b": peft.LoraConfig(r=8, lora_alpha=4, target_modules=targets[1]),  # other targets
        "c": peft.LoraConfig(r=2, lora_alpha=2, target_modules=targets[0], use_rslora=True),
    }
    pm = peft.get_peft_model(model, cfgs["a"], adapter_name="a")
    for name in ("b", "c"):
        pm.add_adapter(name, cfgs[name])
    with torch.no_grad():  # peft starts B at zero: give every adapter a visible effect
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    return pm.eval()


@pytest.mark.parametrize("strategy", ["stacked", "gathered"])
@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_rank_stacked_rows_equal_peft_adapter_names(tiny_models, family, strategy):
    pm = _with_adapters(tiny_models[family], family)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(7, 60, (7, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    rows = ["a", "b", "__base__", "c", "a", "b", "c"]
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask, adapter_names=rows).last_hidden_state
        mixed = MixedLoRA(pm, strategy=strategy)
        assert mixed.supported(rows)
        with mixed.rows(rows):
            got = pm(input_ids=ids, attention_mask=mask).last_hidden_state
        assert mixed.last_strategy == strategy
        with pm.disable_adapter():
            plain = pm(input_ids=ids, attention_mask=mask).last_hidden_state
        after = pm(input_ids=ids, attention_mask=mask, adapter_names=rows).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the adapters really changed the rows, and __base__ rows are the bare base
    assert (want[0] - plain[0]).abs().max() > 1e-3
    torch.testing.assert_close(got[2], plain[2], atol=1e-6, rtol=0)
    # outside the block the layers are back to peft's own behaviour
    torch.testing.assert_close(after, want, atol=0, rtol=0)


def test_stacks_follow_weight_changes_after_refresh(tiny_models):
    pm = _with_adapters(tiny_models["bert"], "bert")
    ids = torch.randint(7, 60, (2, 8))
    mixed = MixedLoRA(pm)
    with torch.no_grad(), mixed.rows(["a", "a"]):
        before = pm(input_ids=ids).last_hidden_state
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B.a" in n:
                p.mul_(2)
    mixed.refresh()
    with torch.no_grad(), mixed.rows(["a", "a"]):
        got = pm(input_ids=ids).last_hidden_state
        want = pm(input_ids=ids, adapter_names=["a", "a"]).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - before).abs().max() > 1e-3


def test_auto_gathers_once_a_forward_holds_many_adapters_and_matches_peft(tiny_models):
    from peftkit.serving.mixed import GATHER_FROM

    pm = _with_adapters(tiny_models["bert"], "bert")
    extra = [f"x{i}" for i in range(GATHER_FROM)]
    for i, name in enumerate(extra):  # ranks 4 and 3 next to a's 4: stacking adds > 8x r
        pm.add_adapter(name, peft.LoraConfig(r=4 - i % 2 * (i < 2), target_modules=["query"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    ids = torch.randint(7, 60, (GATHER_FROM + 3, 10), generator=torch.Generator().manual_seed(2))
    mixed = MixedLoRA(pm.eval())
    few = ["a", "b", "__base__"] + ["a"] * GATHER_FROM
    many = ["a", "__base__", "c", *extra]
    assert mixed.choose(few) == "stacked" and mixed.choose(many) == "gathered"
    with torch.no_grad():
        for rows in (few, many):
            want = pm(input_ids=ids, adapter_names=rows).last_hidden_state
            with mixed.rows(rows):
                got = pm(input_ids=ids).last_hidden_state
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert mixed.last_strategy == "gathered"
        # the bank of every adapter follows weight changes after refresh()
        for n, p in pm.named_parameters():
            if f"lora_B.{extra[0]}" in n:
                p.mul_(3)
        mixed.refresh()
        with mixed.rows(many):
            got = pm(input_ids=ids).last_hidden_state
        want = pm(input_ids=ids, adapter_names=many).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="strategy must be one of"):
        MixedLoRA(pm, strategy="fast")


def test_dora_and_unknown_adapters_are_not_claimed(tiny_models):
    pm = _with_adapters(tiny_models["bert"], "bert")
    pm.add_adapter("d", peft.LoraConfig(r=2, target_modules=["query"], use_dora=True))
    mixed = MixedLoRA(pm)
    assert mixed.supported(["a", "__base__"])
    assert not mixed.supported(["a", "d"])
    assert not mixed.supported(["nope"])


def test_padding_batches_cover_every_row_once_and_bound_padding():
    import random

    from peftkit.data.batching import padding_batches

    rng = random.Random(0)
    lengths = [rng.choice([3, 4, 5, 40, 41, 60]) for _ in range(100)]
    batches = padding_batches(lengths, 16, max_padding=0.2)
    assert sorted(i for b in batches for i in b) == list(range(100))
    for b in batches:
        assert 1 <= len(b) <= 16
        widest = max(lengths[i] for i in b)
        assert 1 - sum(lengths[i] for i in b) / (len(b) * widest) <= 0.2
    assert padding_batches([], 8) == []
