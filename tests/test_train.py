from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import synthetic
from safetensors.torch import load_file

import peftkit.training.loop as loop_module
from peftkit.adapters.folder import release
from peftkit.adapters.model import build_task_model, trainable_parameters
from peftkit.config.presets import METHODS, load_preset
from peftkit.errors import ConfigError, TrainingError
from peftkit.models.base import load_base
from peftkit.training.train import TrainConfig, train

QUICK = dict(batch_size=8, progress=False, eval_every=1000, patience=None)


def _base(tiny_models, family, method="lora"):
    spec = load_preset(method)
    return load_base(tiny_models[family], kind="encoder", quantization=spec.quantization), spec


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_every_family(tiny_models, tmp_path, family, method):
    base, spec = _base(tiny_models, family, method)
    frozen = {
        n: p.detach().clone() for n, p in base.model.named_parameters() if p.dtype.is_floating_point
    }
    data = synthetic("topic", n=32)
    result = train(base, spec, data, TrainConfig(max_steps=2, **QUICK), tmp_path / "run")
    assert result.steps == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history if "loss" in r)
    assert 0 < result.trainable < result.total or method == "full"
    assert set(result.test_metrics) >= {"accuracy", "macro_f1"}
    assert result.report.labels == data.labels
    release(result.model)
    # The shared base is never changed by training an adapter (full trains a copy).
    for name, param in base.model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"{method} changed base weight {name}"


@pytest.mark.parametrize("method", ["lora", "lora-all-linear", "ia3"])
def test_gpt2_conv1d_layers_are_adapted_without_peft_warnings(tiny_models, method, recwarn):
    """GPT-2's Conv1D layers need fan_in_fan_out=True; peft warned on every build without it."""
    base, spec = _base(tiny_models, "gpt2", method)
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        before = base.model(input_ids=ids).last_hidden_state
    model = build_task_model(base.model, spec, num_labels=2)
    fan = [str(w.message) for w in recwarn.list if "fan_in_fan_out" in str(w.message)]
    assert not fan, fan
    assert model.body.peft_config["default"].fan_in_fan_out is True
    with torch.no_grad():  # an untrained adapter is the identity: the layers read the right axes
        after = model.body(input_ids=ids).last_hidden_state
    torch.testing.assert_close(after, before)
    release(model)


def test_full_trains_a_float32_copy_and_refuses_kbit_weights(tiny_models):
    half = load_base(str(tiny_models["bert"]), dtype="bfloat16")
    model = build_task_model(half.model, load_preset("full"), num_labels=2)
    assert {p.dtype for p in model.body.parameters()} == {torch.float32}
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}  # the base untouched
    release(model)
    kbit = load_base(str(tiny_models["bert"]), quantization="8bit")
    with pytest.raises(ConfigError, match="method 'full' trains every weight, and k-bit"):
        build_task_model(kbit.model, load_preset("full"), num_labels=2)


def test_trainable_parameter_counts_are_ordered(tiny_models):
    counts = {}
    for method in ("probe", "ia3", "lora", "full"):
        base, spec = _base(tiny_models, "bert", method)
        model = build_task_model(base.model, spec, num_labels=3)
        counts[method] = trainable_parameters(model)[0]
    assert counts["probe"] < counts["ia3"] < counts["lora"] < counts["full"]
    assert counts["probe"] == 32 * 3 + 3  # hidden 32 x 3 labels + bias


@pytest.mark.parametrize(
    "family,ffn", [("bert", "intermediate.dense"), ("llama", "mlp.up_proj"), ("gpt2", "mlp.c_fc")]
)
def test_all_linear_preset_adapts_the_feed_forward_layers(tiny_models, tmp_path, family, ffn):
    base, spec = _base(tiny_models, family, "lora-all-linear")
    qv = build_task_model(base.model, load_preset("lora"), num_labels=2)
    qv_count = trainable_parameters(qv)[0]
    release(qv)
    model = build_task_model(base.model, spec, num_labels=2)
    adapted = [n for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    assert any(ffn in n for n in adapted), adapted
    assert trainable_parameters(model)[0] > qv_count
    release(model)
    result = train(
        base, spec, synthetic("topic", n=32), TrainConfig(max_steps=2, **QUICK), tmp_path
    )
    assert result.steps == 2
    release(result.model)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_wrapping_the_base_adds_no_peft_deprecation_noise(tiny_models, recwarn, method):
    # peft reads transformers' deprecated is_gradient_checkpointing on every wrap
    base, spec = _base(tiny_models, "bert", method)
    release(build_task_model(base.model, spec, num_labels=2))
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]


def test_lora_learns_the_synthetic_task(tiny_models, tmp_path):
    base, spec = _base(tiny_models, "bert")
    config = TrainConfig(epochs=12, batch_size=8, learning_rate=5e-2, progress=False, patience=None)
    result = train(base, spec, synthetic("sentiment"), config, tmp_path / "run")
    assert result.test_metrics["accuracy"] >= 0.8
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    evals = [r for r in history if "eval_accuracy" in r]
    assert len(evals) == 12  # once per epoch
    assert result.best["step"] in [r["step"] for r in evals]


def test_a_trained_model_comes_back_ready_to_predict(tiny_models, tmp_path, monkeypatch):
    """train() returns its model with dropout off (two calls agree) and leaves the shared base
    in the mode it was loaded in; scoring during training puts the model back in train mode."""
    base, spec = _base(tiny_models, "bert")  # LoRA dropout 0.1 and head dropout 0.1
    data = synthetic("topic", n=32)
    seen = []
    from peftkit.training import predict as predict_module

    original = predict_module.predict_logits

    def spy(model, *args, **kwargs):
        out = original(model, *args, **kwargs)
        seen.append(model.training)
        return out

    monkeypatch.setattr(predict_module, "predict_logits", spy)
    config = TrainConfig(max_steps=4, batch_size=8, progress=False, eval_every=2)
    result = train(base, spec, data, config, tmp_path / "run")
    assert seen[:2] == [True, True]  # the two evaluations during training
    assert not [n for n, m in result.model.named_modules() if m.training]
    ids, mask = torch.tensor([[5, 9, 2, 7, 3, 8]]), torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(result.model(ids, mask), result.model(ids, mask))
    release(result.model)
    assert not [n for n, m in base.model.named_modules() if m.training]


def test_early_stopping_keeps_the_best(tiny_models, tmp_path):
    base, spec = _base(tiny_models, "bert")
    # A negligible learning rate never improves: stop after 1 + patience evaluations.
    config = TrainConfig(
        max_steps=50, batch_size=8, learning_rate=1e-12, eval_every=2, patience=2, progress=False
    )
    result = train(base, spec, synthetic("sentiment"), config, tmp_path / "run")
    assert result.steps == 6
    assert result.best["step"] == 2
    assert (tmp_path / "run" / "checkpoints" / "best" / "trainable.safetensors").is_file()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_models, tmp_path, monkeypatch):
    base, spec = _base(tiny_models, "bert")
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 8 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", flaky)
    config = TrainConfig(max_steps=20, checkpoint_every=5, **QUICK)
    with pytest.raises(TrainingError, match=r"loss became nan at step 8.*checkpoint"):
        train(base, spec, synthetic("sentiment"), config, tmp_path / "run")
    state = json.loads((tmp_path / "run" / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == 5
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "last" / "trainable.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_kill_9_then_resume_matches_uninterrupted_run(tiny_models, tmp_path):
    worker = Path(__file__).parent / "_train_worker.py"
    steps = 120
    run = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, str(worker), str(tiny_models["bert"]), str(run), str(steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    state = run / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 10:
            break
        time.sleep(0.05)
    assert child.poll() is None, "the child finished before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 10 <= killed_at < steps

    resumed = subprocess.run(
        [sys.executable, str(worker), str(tiny_models["bert"]), str(run), str(steps)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"steps={steps} resumed_from={killed_at}" in resumed.stdout
    straight = subprocess.run(
        [
            sys.executable,
            str(worker),
            str(tiny_models["bert"]),
            str(tmp_path / "straight"),
            str(steps),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"steps={steps} resumed_from=0" in straight.stdout
    a = load_file(str(run / "checkpoints" / "last" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "straight" / "checkpoints" / "last" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_bad_training_settings_are_named():
    with pytest.raises(ConfigError, match="scheduler='cosin'"):
        TrainConfig(scheduler="cosin")
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)


def test_loraplus_gives_lora_b_a_larger_learning_rate(tiny_models, tmp_path):
    from peftkit.training.schedule import make_optimizer

    base, spec = _base(tiny_models, "bert")
    model = build_task_model(base.model, spec, num_labels=2)
    opt = make_optimizer(model, 1e-3, 0.01, loraplus_lr_ratio=16)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    b = [n for n, p in names.items() if "lora_B" in n]
    a = [n for n, p in names.items() if "lora_A" in n]
    assert b and a
    assert {lr_of[id(names[n])] for n in b} == {16e-3}
    assert {lr_of[id(names[n])] for n in a} == {1e-3}
    # every trainable weight is optimized, none twice
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, trainable)) == sorted(lr_of)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    release(model)
    # and it trains end to end, the schedule scaling every group
    config = TrainConfig(max_steps=3, loraplus_lr_ratio=16, learning_rate=1e-3, **QUICK)
    result = train(base, spec, synthetic("sentiment", n=32), config, tmp_path / "run")
    assert result.steps == 3
    release(result.model)


def test_label_smoothing_reaches_the_loss(tiny_models, tmp_path, monkeypatch):
    base, spec = _base(tiny_models, "bert")
    seen = []
    real = torch.nn.functional.cross_entropy

    def spy(logits, labels, **kwargs):
        seen.append(kwargs.get("label_smoothing", 0.0))
        return real(logits, labels, **kwargs)

    monkeypatch.setattr(loop_module.torch.nn.functional, "cross_entropy", spy)
    config = TrainConfig(max_steps=2, label_smoothing=0.2, **QUICK)
    result = train(base, spec, synthetic("sentiment", n=32), config, tmp_path / "run")
    assert seen == [0.2, 0.2]
    release(result.model)
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="label_smoothing must be in"):
            TrainConfig(label_smoothing=bad)


def test_loraplus_without_lora_is_refused(tiny_models, tmp_path):
    base, spec = _base(tiny_models, "bert", "ia3")
    config = TrainConfig(max_steps=1, loraplus_lr_ratio=16, **QUICK)
    with pytest.raises(ConfigError, match="loraplus_lr_ratio needs a LoRA adapter"):
        train(base, spec, synthetic("sentiment", n=32), config, tmp_path / "run")
    with pytest.raises(ConfigError, match="loraplus_lr_ratio must be >= 1"):
        TrainConfig(loraplus_lr_ratio=0.5)


def test_a_failed_run_leaves_the_shared_base_clean(tiny_models, tmp_path):
    from peftkit.adapters.model import Head

    base, spec = _base(tiny_models, "bert")
    before = sorted(n for n, _ in base.model.named_parameters())
    wrong = Head(32, 5)  # the data has 2 labels
    config = TrainConfig(max_steps=1, **QUICK)
    data = synthetic("sentiment", n=32)
    with pytest.raises(ConfigError, match="head_init has 5 outputs"):
        train(base, spec, data, config, tmp_path / "a", head_init=wrong)
    assert sorted(n for n, _ in base.model.named_parameters()) == before
    # the same base trains the next adapter as if nothing happened
    result = train(base, spec, data, config, tmp_path / "b")
    assert result.steps == 1
    release(result.model)
    assert sorted(n for n, _ in base.model.named_parameters()) == before


def test_a_run_collapsed_to_one_label_is_reported(tiny_models, tmp_path, caplog):
    from peftkit.adapters.model import Head

    base, spec = _base(tiny_models, "bert")
    stuck = Head(32, 2)
    with torch.no_grad():
        stuck.linear.weight.zero_()
        stuck.linear.bias.copy_(torch.tensor([0.0, 50.0]))  # always the second label
    config = TrainConfig(max_steps=2, learning_rate=1e-12, **{**QUICK, "eval_every": 1})
    data = synthetic("sentiment", n=32)
    with caplog.at_level("WARNING", logger="peftkit.training.predict"):
        result = train(base, spec, data, config, tmp_path / "run", head_init=stuck)
    release(result.model)
    collapsed = [
        r.getMessage() for r in caplog.records if "collapsed to one label" in r.getMessage()
    ]
    assert len(collapsed) == 2  # at each evaluation
    assert f"predicted {data.labels[1]!r}" in collapsed[0]


def test_mixed_predictions_are_not_a_collapse(caplog):
    import numpy as np

    from peftkit.training.predict import warn_if_collapsed

    with caplog.at_level("WARNING", logger="peftkit.training.predict"):
        warn_if_collapsed(np.array([0, 0, 0, 1]), ("a", "b"), 5, True)
        warn_if_collapsed(np.array([1, 1, 1]), ("a", "b"), 5, True)  # too few rows to tell
        warn_if_collapsed(np.array([1, 1, 1, 1]), ("a", "b"), 5, False)  # not the main process
    assert not caplog.records
    with caplog.at_level("WARNING", logger="peftkit.training.predict"):
        warn_if_collapsed(np.array([1, 1, 1, 1]), ("a", "b"), 5, True)
    assert "step 5: all 4 validation rows are predicted 'b'" in caplog.records[0].getMessage()


def test_bad_presets_are_named(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        load_preset("lorra")
    bad = tmp_path / "mine.yaml"
    bad.write_text("method: lora\npef: {r: 4}\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: unknown key 'pef'.*did you mean 'peft'"):
        load_preset(bad)
    bad.write_text("method: lora\npeft: {rank: 4}\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: adapter.peft.rank is not a lora option"):
        load_preset(bad)  # refused as it loads, not when the model is wrapped
    bad.write_text("method: lora\n  peft: [\n")
    with pytest.raises(ConfigError, match=r"mine.yaml, line \d+: invalid YAML"):
        load_preset(bad)


def test_one_label_is_refused(tiny_models):
    base, spec = _base(tiny_models, "bert")
    with pytest.raises(ConfigError, match="at least 2 labels"):
        build_task_model(base.model, spec, num_labels=1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_verbalizer_head_starts_as_the_lm_scores(tiny_models, tmp_path, family):
    """Before training, a verbalizer head's logits equal the LM's next-token logits for the
    label words; then it trains like any head and serves with its template."""
    from peftkit.adapters.model import verbalizer_token_ids

    base = load_base(tiny_models[family], kind="causal-lm")
    words = {"negative": " bad", "positive": " good"}
    ids = verbalizer_token_ids(base.tokenizer, words)
    model = build_task_model(base.model, load_preset("lora"), 2, verbalizer=ids)
    model.eval()
    batch = base.tokenizer(["the movie was great"], return_tensors="pt")
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"])
        lm = base.model(**batch).logits[:, -1, list(ids.values())]
    torch.testing.assert_close(ours, lm, atol=1e-4, rtol=1e-4)
    release(model)

    config = TrainConfig(max_steps=3, **QUICK)
    result = train(
        base,
        load_preset("lora"),
        synthetic("sentiment", n=32),
        config,
        tmp_path / "run",
        template="{text} it was",
        verbalizer=words,
    )
    assert result.steps == 3
    release(result.model)
    with pytest.raises(ConfigError, match="no word for labels"):
        train(
            base,
            load_preset("lora"),
            synthetic("sentiment", n=32),
            config,
            tmp_path / "run2",
            verbalizer={"positive": " good"},
        )


def test_verbalizer_words_must_differ(tiny_models):
    from peftkit.adapters.model import verbalizer_token_ids

    base = load_base(tiny_models["llama"], kind="causal-lm")
    with pytest.raises(ConfigError, match="same token"):
        verbalizer_token_ids(base.tokenizer, {"a": " good", "b": " good film"})
    with pytest.raises(ConfigError, match="tokenizes to nothing"):
        verbalizer_token_ids(base.tokenizer, {"a": "", "b": " bad"})


def _fake_clock(monkeypatch, stop_at: int | None = None):
    """A training clock where each training step costs exactly 1 s and nothing else costs
    time; optionally Ctrl-C at step ``stop_at``."""
    import peftkit.training.loop as loop_mod

    clock = {"t": 0.0, "steps": 0}
    real = torch.nn.functional.cross_entropy

    def step_loss(*args, **kwargs):
        if torch.is_grad_enabled():
            clock["t"] += 1.0
            clock["steps"] += 1
            if stop_at is not None and clock["steps"] == stop_at:
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "clock", lambda: clock["t"])
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", step_loss)
    return clock


def test_time_budget_ends_the_run_annealed(tiny_models, tmp_path, monkeypatch):
    base, spec = _base(tiny_models, "bert")
    _fake_clock(monkeypatch)
    config = TrainConfig(max_steps=1000, max_minutes=0.5, log_every=1, **QUICK)
    result = train(base, spec, synthetic("sentiment"), config, tmp_path / "run")
    # 30 s at 1 s a step: the horizon set after 10 steps is 30, and the schedule decays to it.
    assert result.steps == 30
    lrs = [r["lr"] for r in result.history if "lr" in r]
    assert lrs[-1] == 0.0 and max(lrs) > 0
    state = json.loads((tmp_path / "run" / "checkpoints" / "last" / "state.json").read_text())
    assert state["elapsed_s"] == pytest.approx(30.0)
    assert [r["step"] for r in result.history if "eval_accuracy" in r] == [30]


def test_time_budget_carries_over_a_resume(tiny_models, tmp_path, monkeypatch):
    base, spec = _base(tiny_models, "bert")
    config = TrainConfig(max_steps=1000, max_minutes=0.5, checkpoint_every=5, **QUICK)
    _fake_clock(monkeypatch, stop_at=18)
    with pytest.raises(KeyboardInterrupt):
        train(base, spec, synthetic("sentiment"), config, tmp_path / "run")
    state = json.loads((tmp_path / "run" / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == 15 and state["elapsed_s"] == pytest.approx(15.0)
    base, spec = _base(tiny_models, "bert")  # a fresh process would load a fresh base
    _fake_clock(monkeypatch)
    result = train(base, spec, synthetic("sentiment"), config, tmp_path / "run")
    assert result.resumed_from == 15
    assert result.steps == 30  # the 15 s already spent count against the budget


def test_budget_horizon_leaves_room_for_evaluations():
    from peftkit.training.schedule import budget_horizon

    # 100 s left, 1 s a step, a 10 s evaluation every 10 steps: 2 s a step, less the final one
    assert budget_horizon(0, 10_000, 100.0, 1.0, 10.0, 10) == 45
    assert budget_horizon(7, 20, 100.0, 1.0, 0.0, 10) == 20  # the cap wins
    assert budget_horizon(7, 20, -5.0, 1.0, 0.0, 10) == 7  # nothing left: stop now
    with pytest.raises(ConfigError, match="max_minutes must be > 0"):
        TrainConfig(max_minutes=0)


def test_resume_without_budget_takes_the_configured_length(tiny_models, tmp_path, monkeypatch):
    base, spec = _base(tiny_models, "bert")
    _fake_clock(monkeypatch, stop_at=8)
    with pytest.raises(KeyboardInterrupt):
        train(
            base,
            spec,
            synthetic("sentiment"),
            TrainConfig(max_steps=10, checkpoint_every=5, **QUICK),
            tmp_path / "run",
        )
    base, spec = _base(tiny_models, "bert")
    _fake_clock(monkeypatch)
    longer = TrainConfig(max_steps=12, checkpoint_every=5, log_every=1, **QUICK)
    result = train(base, spec, synthetic("sentiment"), longer, tmp_path / "run")
    assert result.resumed_from == 5 and result.steps == 12
    assert [r["lr"] for r in result.history if "lr" in r][-1] == 0.0  # decayed to the new end


def test_replanning_never_raises_the_schedule_factor():
    from peftkit.training.schedule import Schedule

    for kind in ("linear", "cosine"):
        sched = Schedule(kind, total=100, warmup=10)
        factors = [sched(step) for step in range(10)]  # warmup: rising
        plan = {20: 200, 40: 60, 50: 120, 70: 80, 79: 79}  # later, earlier, later, earlier
        for step in range(10, 81):
            if step in plan:
                sched.replan(step, plan[step])
            factors.append(sched(step))
        after = factors[10:]
        assert all(b <= a + 1e-12 for a, b in zip(after, after[1:], strict=False)), kind
        assert after[0] == 1.0 and factors[80] == pytest.approx(0.0, abs=1e-9)
    sched = Schedule("linear", total=100, warmup=10)
    sched.replan(5, 40, warmup=4)  # in warmup: the warmup shortens, nothing is anchored
    assert (sched.warmup, sched.total, sched.anchor_step) == (4, 40, None)


def _eval_costs(monkeypatch, clock, seconds: float):
    """Each validation evaluation in the loop costs ``seconds`` on the fake clock."""
    real = loop_module.evaluate_split

    def costly(*args, **kwargs):
        clock["t"] += seconds
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "evaluate_split", costly)


def test_budget_replans_keep_the_learning_rate_annealing(
    tiny_models, tmp_path, monkeypatch, caplog
):
    base, spec = _base(tiny_models, "bert")
    clock = _fake_clock(monkeypatch)
    real = torch.nn.functional.cross_entropy

    def faster_after_20(*args, **kwargs):  # the horizon moves earlier, then later
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled() and clock["steps"] > 20:
            clock["t"] -= 0.75
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", faster_after_20)
    _eval_costs(monkeypatch, clock, 2.0)
    config = TrainConfig(
        max_steps=1000, max_minutes=1.0, warmup_ratio=0.0, log_every=1,
        **{**QUICK, "eval_every": 10},
    )  # fmt: skip
    with caplog.at_level("INFO", logger="peftkit.training.train"):
        result = train(base, spec, synthetic("sentiment"), config, tmp_path / "run")
    release(result.model)
    ends = [r.getMessage() for r in caplog.records if "training now ends at step" in r.getMessage()]
    horizons = [int(m.split("ends at step ")[1].split(" ")[0]) for m in ends]
    assert any(b < a for a, b in zip(horizons, horizons[1:], strict=False)), horizons
    assert any(b > a for a, b in zip(horizons, horizons[1:], strict=False)), horizons
    lrs = [r["lr"] for r in result.history if "lr" in r]
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False)), lrs
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[0] > 0


def test_budget_keeps_room_for_the_final_test_evaluation(
    tiny_models, tmp_path, monkeypatch, caplog
):
    from peftkit.data.load import TextDataset
    from peftkit.training.schedule import budget_horizon, final_eval_reserve

    assert final_eval_reserve(3.0, 30, 90) == pytest.approx(9.0)
    assert final_eval_reserve(0.0, 30, 90) == 0.0  # not measured yet
    assert final_eval_reserve(3.0, 30, 0) == 0.0  # no test split

    base, spec = _base(tiny_models, "bert")
    clock = _fake_clock(monkeypatch)
    _eval_costs(monkeypatch, clock, 3.0)
    small = synthetic("sentiment", n=96)
    data = TextDataset(
        small.name,
        small.labels,
        {**small.splits, "test": synthetic("sentiment", n=192, seed=1).split("test")},
    )
    val_rows, test_rows = len(data.split("validation")), len(data.split("test"))
    assert test_rows == 2 * val_rows
    config = TrainConfig(max_steps=1000, max_minutes=0.5, **{**QUICK, "eval_every": 10})
    with caplog.at_level("INFO", logger="peftkit.training.train"):
        result = train(base, spec, data, config, tmp_path / "run")
    release(result.model)
    reserve = final_eval_reserve(3.0, val_rows, test_rows)  # 6 s
    # at step 10: 10 s of steps + 3 s of evaluation spent, the test evaluation's 6 s kept
    assert result.steps == budget_horizon(10, 1000, 30.0 - 13.0 - reserve, 1.0, 3.0, 10)
    assert result.steps < budget_horizon(10, 1000, 30.0 - 13.0, 1.0, 3.0, 10)
    messages = [r.getMessage() for r in caplog.records if r.name == "peftkit.training.train"]
    start = next(m for m in messages if "training.max_minutes=0.5" in m)
    assert "covers training steps, validation evaluations and checkpoints" in start
    assert f"final test evaluation ({test_rows} rows" in start
    expected = next(m for m in messages if "is expected to take" in m)
    assert f"({test_rows} rows) is expected to take {reserve:.1f} s" in expected


def test_run_log_hears_of_steps_and_evaluations(tiny_models, tmp_path, caplog):
    base, spec = _base(tiny_models, "bert")
    config = TrainConfig(max_steps=6, log_every=2, **{**QUICK, "eval_every": 3})
    with caplog.at_level("INFO", logger="peftkit.training.loop"):
        result = train(base, spec, synthetic("sentiment", n=48), config, tmp_path / "run")
    release(result.model)
    messages = [
        r.getMessage()
        for r in caplog.records
        if r.name == "peftkit.training.loop" and r.levelname == "INFO"
    ]
    steps = [m for m in messages if ": loss " in m]
    assert [m.split(":")[0] for m in steps] == ["step 2/6", "step 4/6", "step 6/6"]
    logged = {row["step"]: row for row in result.history if "loss" in row}
    assert f"loss {logged[4]['loss']:.4f}, lr {logged[4]['lr']:.3g}" in steps[1]
    evals = [m for m in messages if "validation" in m]
    assert [m.split(":")[0] for m in evals] == ["step 3", "step 6"]
    scores = [row for row in result.history if "eval_accuracy" in row]
    assert f"accuracy {scores[1]['eval_accuracy']:.4f}" in evals[1]
    assert f"best accuracy {result.best['accuracy']:.4f} at step {result.best['step']}" in evals[1]


@pytest.mark.parametrize(
    "preset,overrides,message",
    [
        ("lora", {"learning_rate": float("nan")}, "adapter.learning_rate must be a finite"),
        ("lora", {"learning_rate": -1}, "adapter.learning_rate must be a finite number > 0"),
        ("lora", {"learning_rate": float("inf")}, "got inf"),
        ("lora", {"learning_rate": "fast"}, "must be numbers, got 'fast'"),
        ("lora", {"head": {"dropout": 1.0}}, "adapter.head.dropout must be in [0, 1)"),
        ("lora", {"peft": {"r": 0}}, "adapter.peft.r must be >= 1, got 0"),
        ("qlora", {"peft": {"r": 2.5}}, "adapter.peft.r must be a whole number >= 1, got 2.5"),
        ("lora", {"peft": {"lora_alpha": 0}}, "adapter.peft.lora_alpha must be a number > 0"),
        ("lora", {"peft": {"lora_dropout": 1.5}}, "adapter.peft.lora_dropout must be in [0, 1)"),
        ("lora", {"peft": {"bias": "every"}}, "adapter.peft.bias must be one of none, all"),
        ("lora", {"peft": {"rank": 8}}, "adapter.peft.rank is not a lora option (did you mean 'r'?)"),
        ("lora", {"peft": {"lora_alfa": 8}}, "(did you mean 'lora_alpha'"),
        ("lora", {"peft": {"task_type": "SEQ_CLS"}}, "adapter.peft.task_type is not a lora option"),
        ("prefix", {"peft": {"num_virtual_tokens": 0}}, "adapter.peft.num_virtual_tokens must be"),
        ("prefix", {"peft": {"r": 8}}, "adapter.peft.r is not a prefix option"),
        ("ia3", {"peft": {"target_modules": ["query"], "feedforward_modules": ["value"]}},
         "adapter.peft is refused by peft's IA3Config: `feedforward_modules` should be a subset"),
        ("lora", {"peft": {"layers_pattern": "layer"}},
         "adapter.peft.layers_pattern='layer' is refused by peft's LoraConfig: When"),
        ("prompt-tuning", {"peft": {"prompt_tuning_init": "TEXT"}},
         "adapter.peft.prompt_tuning_init='TEXT' is refused by peft's PromptTuningConfig"),
    ],
)  # fmt: skip
def test_bad_preset_values_are_refused_without_a_model(monkeypatch, preset, overrides, message):
    import transformers

    import peftkit.models.base as base_module

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded to check a preset")

    monkeypatch.setattr(base_module, "load_base", no_model)
    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", no_model)
    with pytest.raises(ConfigError) as caught:
        load_preset(preset, overrides=overrides)
    text = str(caught.value)
    assert message in text and "\n" not in text
    assert f"{preset}.yaml: " in text  # where: the preset file
    if "not a" in message:
        assert "; valid keys: " in text


def test_every_built_in_preset_passes_its_own_checks():
    from peftkit.config.presets import available_presets

    for name in available_presets():
        spec = load_preset(name)
        assert spec.learning_rate > 0
    # in-range values pass: the checks are of ranges, not of the presets' own values
    spec = load_preset("lora", overrides={"peft": {"r": 1, "lora_dropout": 0.0, "bias": "all"}})
    assert spec.peft["r"] == 1 and spec.peft["bias"] == "all"


def _long_texts(data, words: int):
    from peftkit.data.load import Split, TextDataset

    def longer(split):
        return Split(tuple(" ".join([t] * words) for t in split.texts), split.labels)

    return TextDataset(data.name, data.labels, {k: longer(v) for k, v in data.splits.items()})


def test_max_length_beyond_the_model_is_capped_once_with_a_warning(tiny_models, tmp_path, caplog):
    base, spec = _base(tiny_models, "bert")
    positions = base.model.config.max_position_embeddings  # 64 in the tiny BERT
    data = _long_texts(synthetic("sentiment", n=32), words=30)  # rows of 60-200 tokens
    assert max(len(t.split()) for t in data.split("train").texts) > positions
    config = TrainConfig(max_steps=2, max_length=100_000, **QUICK)
    with caplog.at_level("WARNING", logger="peftkit.training.train"):
        result = train(base, spec, data, config, tmp_path / "run")
    release(result.model)
    assert result.steps == 2 and set(result.test_metrics) >= {"accuracy"}
    capped = [r.getMessage() for r in caplog.records if "positions" in r.getMessage()]
    assert capped == [
        f"training.max_length=100000 is more than this model's {positions} positions; rows are "
        f"cut to {positions} tokens for training and evaluation"
    ]


def test_position_limits_follow_the_architecture():
    import transformers as tf

    from peftkit.data.batching import position_limit

    assert position_limit(tf.BertConfig(max_position_embeddings=96)) == 96
    assert position_limit(tf.RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert position_limit(tf.XLMRobertaConfig(max_position_embeddings=40, pad_token_id=1)) == 38
    assert position_limit(tf.GPT2Config(n_positions=80)) == 80
    assert position_limit(tf.BloomConfig()) is None  # ALiBi: no position table
