from __future__ import annotations

import logging
import shutil
import time

import pytest
import torch

from peftkit.errors import ConfigError, ModelError
from peftkit.models import assets
from peftkit.models.base import load_base, quantization_config, resolve_dtype


@pytest.mark.parametrize(
    "family,kind", [("bert", "encoder"), ("llama", "causal-lm"), ("gpt2", "causal-lm")]
)
def test_tiny_models_load_with_inferred_kind(tiny_models, family, kind):
    base = load_base(tiny_models[family])
    assert base.kind == kind
    assert not any(p.requires_grad for p in base.model.parameters())
    batch = base.tokenizer(["the movie was great", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = base.model(**batch)
    first = out.last_hidden_state if kind == "encoder" else out.logits
    assert first.shape[0] == 2 and torch.isfinite(first).all()
    model, tokenizer = base  # unpacks as a pair
    assert model is base.model and tokenizer is base.tokenizer


def test_fingerprint_is_stable_and_tells_weights_apart(tiny_models, tmp_path):
    a = load_base(tiny_models["bert"]).fingerprint
    b = load_base(tiny_models["bert"]).fingerprint
    assert a.id == b.id
    # Same architecture and config, different weights: a different fingerprint.
    other = tmp_path / "other"
    shutil.copytree(tiny_models["bert"], other)
    base = load_base(other)
    with torch.no_grad():
        base.model.embeddings.word_embeddings.weight.add_(0.5)
    base.model.save_pretrained(other)
    c = load_base(other).fingerprint
    assert c.architecture == a.architecture and c.config_hash == a.config_hash
    assert c.id != a.id


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_kbit_tiny_encoder_runs_on_cpu(tiny_models, quant):
    base = load_base(tiny_models["bert"], quantization=quant)
    full = load_base(tiny_models["bert"])
    assert base.quantization == quant
    assert base.model.get_memory_footprint() < full.model.get_memory_footprint()
    # The fingerprint id ignores quantization: an adapter trained on one applies to the other.
    assert base.fingerprint.id == full.fingerprint.id
    batch = base.tokenizer(["the film was fun"], return_tensors="pt")
    with torch.no_grad():
        q = base.model(**batch).last_hidden_state
        f = full.model(**batch).last_hidden_state
    assert torch.isfinite(q).all()
    assert torch.nn.functional.cosine_similarity(q.flatten(), f.flatten(), dim=0) > 0.9
    # a save between two forwards changes nothing (bitsandbytes' AVX512-BF16 CPU repacking,
    # which peftkit turns off, unpacks lossily in state_dict(); see base.keep_4bit_layout)
    base.model.state_dict()
    with torch.no_grad():
        again = base.model(**batch).last_hidden_state
    assert torch.equal(q, again)
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in base.model.modules())


def test_4bit_config_uses_float32_compute_on_cpu():
    cfg = quantization_config("4bit", double_quant=True, on_cuda=False)
    assert cfg.bnb_4bit_compute_dtype == torch.float32
    assert cfg.bnb_4bit_use_double_quant is True
    assert cfg.bnb_4bit_quant_type == "nf4"
    assert {"lm_head", "score"} <= set(cfg.llm_int8_skip_modules)
    assert quantization_config("4bit", on_cuda=True).bnb_4bit_compute_dtype == torch.bfloat16


def test_4bit_layers_compute_in_the_dtype_asked_for(tiny_models):
    """``dtype`` sets the 4-bit layers' compute dtype too (bf16 on an AMX CPU is the fast
    way); unset, a CPU computes in float32. A QLoRA classifier trains on the bf16 one."""
    import bitsandbytes as bnb

    from peftkit.adapters.model import build_task_model
    from peftkit.config.presets import AdapterSpec

    def compute_dtypes(base):
        layers = [m for m in base.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers
        return {m.compute_dtype for m in layers}

    assert compute_dtypes(load_base(tiny_models["llama"], quantization="4bit")) == {torch.float32}
    half = load_base(tiny_models["llama"], quantization="4bit", dtype="bfloat16")
    assert compute_dtypes(half) == {torch.bfloat16}
    batch = half.tokenizer(["the movie was great", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = half.model(**batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    model = build_task_model(half.model, AdapterSpec(method="qlora", source="test"), 2)
    out = model(batch["input_ids"], batch["attention_mask"])
    loss = torch.nn.functional.cross_entropy(out.float(), torch.tensor([1, 0]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_unknown_source_lists_packaged_names():
    with pytest.raises(ModelError, match="minilm.*smollm2-135m") as err:
        load_base("minlm")
    assert "did you mean 'minilm'" in str(err.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_base(tmp_path)


def test_bad_quantization_and_kind_are_named(tiny_models):
    with pytest.raises(ConfigError, match="quantization='4-bit'"):
        load_base(tiny_models["bert"], quantization="4-bit")
    with pytest.raises(ConfigError, match="kind='decoder'"):
        load_base(tiny_models["bert"], kind="decoder")


def test_dtype_by_name_sets_the_weights_and_keeps_the_fingerprint(tiny_models):
    half = load_base(str(tiny_models["llama"]), dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    full = load_base(str(tiny_models["llama"]))
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}
    # the same checkpoint: adapters trained on one load on the other
    assert half.fingerprint.id == full.fingerprint.id
    with pytest.raises(ConfigError, match="dtype='bf16' is not valid; use one of float32, bfloat"):
        load_base(tiny_models["llama"], dtype="bf16")
    with pytest.raises(ConfigError, match="dtype=torch.int8 is not valid"):
        resolve_dtype(torch.int8, on_cuda=False)
    assert resolve_dtype(None, on_cuda=False) is torch.float32
    assert resolve_dtype(None, on_cuda=True) is torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_half_dtype_warns_where_the_cpu_would_emulate_it(monkeypatch, caplog, native):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: native, raising=False)
    with caplog.at_level(logging.WARNING, logger="peftkit.models.base"):
        assert resolve_dtype("bfloat16", on_cuda=False) is torch.bfloat16
        assert resolve_dtype(torch.float16, on_cuda=False) is torch.float16
        resolve_dtype("float32", on_cuda=False)
        resolve_dtype("bfloat16", on_cuda=True)  # a GPU: no CPU check
    warned = [r.getMessage() for r in caplog.records]
    if native:
        assert warned == []
    else:
        assert len(warned) == 2 and all("emulated" in w for w in warned)
        assert "AVX512-BF16 or AMX" in warned[0] and "AMX-FP16" in warned[1]


def test_quantization_without_bitsandbytes_says_what_would_work(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("no native library")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModelError, match="pip install.*quantization=None"):
        quantization_config("8bit")


def _fake_gguf(tmp_path):
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    return gguf


def test_interrupted_gguf_conversion_leaves_no_cache(tmp_path, tiny_models, monkeypatch):
    gguf = _fake_gguf(tmp_path)
    cache = tmp_path / "cache"

    def half_then_die(src, dest):
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")  # a partial write
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "convert_gguf", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        assets.gguf_cache(gguf, "fake", cache=cache)
    assert not [p for p in (cache / "models").iterdir() if not p.name.startswith(".")]

    calls = []

    def convert(src, dest):
        calls.append(src)
        shutil.copytree(tiny_models["llama"], dest)

    monkeypatch.setattr(assets, "convert_gguf", convert)
    first = assets.gguf_cache(gguf, "fake", cache=cache)
    again = assets.gguf_cache(gguf, "fake", cache=cache)
    assert first == again and len(calls) == 1
    assert load_base(first).kind == "causal-lm"


def test_cache_without_marker_is_rebuilt(tmp_path, tiny_models, monkeypatch):
    gguf = _fake_gguf(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setattr(
        assets, "convert_gguf", lambda src, dest: shutil.copytree(tiny_models["llama"], dest)
    )
    folder = assets.gguf_cache(gguf, "fake", cache=cache)
    (folder / assets.COMPLETE_MARKER).unlink()  # as if a copy stopped half way
    (folder / "model.safetensors").write_bytes(b"junk")
    rebuilt = assets.gguf_cache(gguf, "fake", cache=cache)
    assert (rebuilt / assets.COMPLETE_MARKER).is_file()
    assert load_base(rebuilt).kind == "causal-lm"


@pytest.mark.real
def test_packaged_minilm_loads_and_embeds():
    a = load_base("minilm")
    assert a.kind == "encoder" and a.fingerprint.architecture.startswith("bert")
    batch = a.tokenizer(["a fine film"], return_tensors="pt")
    with torch.no_grad():
        out = a.model(**batch).last_hidden_state
    assert out.shape[-1] == 384
    assert load_base("minilm").fingerprint.id == a.fingerprint.id


@pytest.mark.real
def test_packaged_smollm2_converts_once_then_loads_fast():
    first = load_base("smollm2-135m")  # converts on a fresh cache (~30 s), else cached
    start = time.perf_counter()
    second = load_base("smollm2-135m")
    cached_seconds = time.perf_counter() - start
    assert second.fingerprint.id == first.fingerprint.id
    assert cached_seconds < 20
    batch = second.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = second.model(**batch).logits
    assert logits.shape[-1] == second.model.config.vocab_size
    assert torch.isfinite(logits).all()
