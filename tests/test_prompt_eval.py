"""Evaluation runs (peftkit.prompting.evaluation): dataset × templates × scorer, one call."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import synthetic

from peftkit.errors import ConfigError, ModelError
from peftkit.metrics.report import compute_metrics, expected_calibration_error
from peftkit.models.base import load_base
from peftkit.prompting.calibration import content_free_probs, contextual_calibration
from peftkit.prompting.evaluation import evaluate_prompts
from peftkit.prompting.scorers import score_causal, score_embedding, score_masked_lm
from peftkit.prompting.templates import load_prompt_set

PROMPTS = """\
family: toy-sentiment
labels: [negative, positive]
verbalizer: {negative: " bad", positive: " good"}
templates:
  plain: "{text} it was"
  question:
    text: "{text} sentence question answer"
    verbalizer: {negative: [" negative", " awful"], positive: [" positive", " great"]}
  masked: {text: "{text} it was {mask}", verbalizer: {negative: "bad", positive: "good"}}
"""


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load_base(str(tiny_models["llama"]))


@pytest.fixture()
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(PROMPTS)
    return path


def test_every_template_row_matches_its_scorer_and_metrics(llama, prompt_file, tmp_path, caplog):
    data = synthetic("sentiment", n=60)
    with caplog.at_level(logging.INFO, logger="peftkit.prompting"):
        run = evaluate_prompts(llama, data, prompt_file, calibration="content-free", batch_size=4)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("peftkit.prompting")]
    # the {mask} template cannot run on a causal LM: skipped, and logged
    assert [r.template for r in run.results] == ["plain", "question"]
    assert any("masked" in s and "masked LM" in s for s in said)
    test = data.split("test")
    assert run.gold == test.labels and len(run.texts) == len(test)
    prompts = load_prompt_set(prompt_file)
    for r in run.results:
        prompt = prompts.get(r.template)

        def probs(texts, prompt=prompt):
            return score_causal(llama.model, llama.tokenizer, prompt, texts, batch_size=4).probs

        raw = probs(list(test.texts))
        want = contextual_calibration(raw, content_free_probs(probs))
        np.testing.assert_allclose(r.probs, want, atol=1e-5)
        m = compute_metrics(list(test.labels), want.argmax(1).tolist(), data.labels)
        assert r.accuracy == pytest.approx(m["accuracy"])
        assert r.macro_f1 == pytest.approx(m["macro_f1"])
        assert r.ece == pytest.approx(expected_calibration_error(want, list(test.labels)))
        before = compute_metrics(list(test.labels), raw.argmax(1).tolist(), data.labels)
        assert r.before is not None
        assert r.before["accuracy"] == pytest.approx(before["accuracy"])
        assert r.examples_per_s > 0 and r.truncated == 0
    s = run.summary()
    accs = [r.accuracy for r in run.results]
    assert s["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert s["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert "before_ece" in s
    table = run.table()
    assert "mean ± std" in table and "plain" in table and "->" in table

    folder = run.save(tmp_path / "out")
    saved = json.loads((folder / "results.json").read_text())
    assert [t["template"] for t in saved["templates"]] == ["plain", "question"]
    assert saved["rows"] == len(test) and saved["config"]["calibration"] == "content-free"
    preds = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 * len(test)
    first = preds[0]
    assert first["text"] == test.texts[0] and first["gold"] == data.labels[test.labels[0]]
    assert first["pred"] == max(first["probs"], key=first["probs"].get)


def test_an_embedding_run_scores_the_sets_descriptions_first(llama, tiny_models, tmp_path, caplog):
    path = tmp_path / "described.yaml"
    described = 'descriptions: {negative: "It was bad.", positive: "It was good."}\ntemplates:'
    path.write_text(PROMPTS.replace("templates:", described))
    data = synthetic("sentiment", n=40)
    bert = load_base(str(tiny_models["bert"]))
    with caplog.at_level(logging.INFO, logger="peftkit.prompting"):
        run = evaluate_prompts(bert, data, path, batch_size=8)  # auto: embedding
    said = [r.getMessage() for r in caplog.records if r.name.startswith("peftkit.prompting")]
    assert [r.template for r in run.results] == ["descriptions", "plain", "question"]
    # a head-less encoder cannot fill a {mask}: that template is skipped, and logged why
    assert said == ["skipping template 'masked': its {mask} needs a masked-LM head, which "
                    "this base has not"]  # fmt: skip
    with pytest.raises(ConfigError, match="masked-lm scorer needs a base with a masked-LM head"):
        evaluate_prompts(bert, data, path, scorer="masked-lm")
    with pytest.raises(ConfigError, match="causal scorer needs a causal LM.*an encoder"):
        evaluate_prompts(bert, data, path, scorer="causal")
    with pytest.raises(ModelError, match="score_causal needs a causal LM.*BertModel"):
        score_causal(bert.model, bert.tokenizer, load_prompt_set(path).get("plain"), ["a b"])
    with pytest.raises(ModelError, match="needs a model with a masked-LM head.*BertModel"):
        score_masked_lm(bert.model, bert.tokenizer, load_prompt_set(path).get("masked"), ["a b"])
    prompts = load_prompt_set(path)
    texts = list(data.split("test").texts)
    for r in run.results:
        verbalizer = prompts.get(r.template).verbalizer
        want = score_embedding(bert.model, bert.tokenizer, texts, verbalizer, labels=data.labels)
        np.testing.assert_allclose(r.probs, want.probs, atol=1e-5)
    assert not np.allclose(run.results[0].probs, run.results[1].probs)
    only = evaluate_prompts(bert, data, path, templates=["descriptions"], max_rows=5)
    assert [r.template for r in only.results] == ["descriptions"]
    # a causal LM scores templates; the descriptions are not one
    causal = evaluate_prompts(llama, data, path, max_rows=4)
    assert [r.template for r in causal.results] == ["plain", "question"]


def test_templates_max_rows_and_demonstrations(llama, prompt_file):
    from peftkit.prompting.scorers.strategies import MIN_SHARED_TOKENS

    shared: list[int] = []  # the demonstrations every query shares run once, alone

    def record(_module, _args, kwargs):
        if kwargs.get("logits_to_keep") == 1 and kwargs["input_ids"].shape[0] == 1:
            shared.append(kwargs["input_ids"].shape[1])

    data = synthetic("sentiment", n=60)
    hook = llama.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run = evaluate_prompts(
            llama, data, prompt_file, templates=["question"], max_rows=7, demonstrations=1,
            seed=3,
        )  # fmt: skip
    finally:
        hook.remove()
    assert [r.template for r in run.results] == ["question"] and len(run.gold) == 7
    assert run.config["method"] == "few-shot-1" and run.config["demo_selection"] == "random"
    assert "mean ± std" not in run.table()  # one template: no spread to show
    assert shared and shared[0] >= MIN_SHARED_TOKENS


def test_a_bfloat16_base_scores_close_to_float32_and_says_so(llama, tiny_models, prompt_file):
    data = synthetic("sentiment", n=40)
    half = load_base(str(tiny_models["llama"]), dtype="bfloat16")
    full = evaluate_prompts(llama, data, prompt_file, batch_size=4)
    run = evaluate_prompts(half, data, prompt_file, batch_size=4)
    assert full.config["base_dtype"] == "float32" and run.config["base_dtype"] == "bfloat16"
    for a, b in zip(full.results, run.results, strict=True):
        assert b.probs.dtype == a.probs.dtype and np.allclose(b.probs.sum(1), 1.0)
        assert np.abs(a.probs - b.probs).max() < 0.05  # bf16 rounding, not another model
        assert not np.allclose(a.probs, b.probs, atol=1e-6)  # and it did run in bf16


def test_bad_arguments_are_named(llama, prompt_file):
    data = synthetic("sentiment", n=30)
    with pytest.raises(ConfigError, match="calibration must be one of"):
        evaluate_prompts(llama, data, prompt_file, calibration="platt")
    with pytest.raises(ConfigError, match="no template 'nope'"):
        evaluate_prompts(llama, data, prompt_file, templates=["nope"])
    with pytest.raises(ConfigError, match="batch_size must be >= 1; got 0"):
        evaluate_prompts(llama, data, prompt_file, batch_size=0)
    with pytest.raises(ConfigError, match="max_rows must be >= 1"):
        evaluate_prompts(llama, data, prompt_file, max_rows=0)
    with pytest.raises(ConfigError, match="only a scorer that fills it"):
        evaluate_prompts(llama, data, prompt_file, templates=["masked"])
    with pytest.raises(ConfigError, match="shared by every query"):
        evaluate_prompts(
            llama, data, prompt_file, demonstrations=1, demo_selection="nearest",
            calibration="content-free",
        )  # fmt: skip
    # the scorer table: a name it has not, demonstrations where the row takes none, a need
    # the base does not meet; the first two before the base is even loaded
    with pytest.raises(
        ConfigError, match="scorer must be one of auto, causal.*did you mean 'causal'"
    ):
        evaluate_prompts("no-such-model", data, prompt_file, scorer="casual")
    with pytest.raises(ConfigError, match="the embedding scorer takes no demonstrations"):
        evaluate_prompts("no-such-model", data, prompt_file, scorer="embedding", demonstrations=1)
    with pytest.raises(
        ConfigError, match="the nli scorer needs an NLI classifier.*use scorer 'causal'"
    ):
        evaluate_prompts(llama, data, prompt_file, scorer="nli")


WORKER = """
import json, sys
sys.path.insert(0, {tests!r})
from helpers import synthetic
from peftkit.prompting.evaluation import evaluate_prompts
run = evaluate_prompts({model!r}, synthetic("sentiment", n=60), {prompts!r}, batch_size=4,
                       demonstrations={demos})
from accelerate import PartialState
if PartialState().is_main_process:
    json.dump({{"probs": [r.probs.tolist() for r in run.results],
               "processes": run.processes}}, open({out!r}, "w"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("demos", [0, 1])  # 1: demonstrations every prompt shares
def test_two_processes_shard_and_gather_the_same_result(
    llama, tiny_models, prompt_file, tmp_path, demos
):
    out = tmp_path / "out.json"
    script = tmp_path / "worker.py"
    tests = str(Path(__file__).resolve().parent)
    model = str(tiny_models["llama"])
    script.write_text(
        WORKER.format(tests=tests, model=model, prompts=str(prompt_file), out=str(out), demos=demos)
    )
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--multi_gpu", str(script),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["processes"] == 2
    alone = evaluate_prompts(
        llama, synthetic("sentiment", n=60), prompt_file, batch_size=4, demonstrations=demos
    )
    for probs, r in zip(got["probs"], alone.results, strict=True):
        np.testing.assert_allclose(np.array(probs), r.probs, atol=1e-5)
