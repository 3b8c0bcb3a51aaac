"""Checkpoints hold no pickle: resuming reads safetensors and JSON only, and a checkpoint
folder holding anything else (an older ``optim.pt``, a planted file) is refused unread."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from helpers import synthetic

import peftkit.training.loop as loop_module
from peftkit.adapters.folder import release
from peftkit.config.presets import load_preset
from peftkit.errors import TrainingError
from peftkit.models.base import load_base
from peftkit.training.checkpoints import CHECKPOINT_FILES, from_json, to_json
from peftkit.training.schedule import Schedule, make_scheduler
from peftkit.training.train import TrainConfig, train

QUICK = dict(batch_size=8, progress=False, eval_every=1000, patience=None, checkpoint_every=5)


class _WritesAFile:
    """Unpickling this object opens ``path`` and writes to it (what a planted pickle does)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran planted code')",))


def _evil_pickle(path) -> bytes:
    return pickle.dumps({"optimizer": _WritesAFile(str(path))})


def _run(tiny_models, run_dir, steps: int):
    base = load_base(tiny_models["bert"])
    config = TrainConfig(max_steps=steps, log_every=1, **QUICK)
    result = train(base, load_preset("lora"), synthetic("sentiment", n=48), config, run_dir)
    release(result.model)
    return result


def test_the_planted_pickle_would_run_code(tmp_path):
    """The payload the next test plants does run its code when unpickled."""
    marker = tmp_path / "proof"
    pickle.loads(_evil_pickle(marker))
    assert marker.read_text() == "ran planted code"


@pytest.mark.parametrize("layout", ["beside", "instead"])
def test_a_planted_optim_pt_is_refused_and_never_unpickled(tiny_models, tmp_path, layout):
    run = tmp_path / "run"
    _run(tiny_models, run, steps=5)
    last = run / "checkpoints" / "last"
    assert sorted(p.name for p in last.iterdir()) == sorted(CHECKPOINT_FILES)
    if layout == "instead":  # the layout of older peftkit: state.json beside optim.pt
        for name in ("optim.safetensors", "optim.json"):
            (last / name).unlink()
    marker = tmp_path / "pwned"
    (last / "optim.pt").write_bytes(_evil_pickle(marker))
    with pytest.raises(TrainingError) as caught:
        _run(tiny_models, run, steps=10)
    message = str(caught.value)
    assert "\n" not in message
    assert "optim.pt" in message and str(last) in message
    assert "delete" in message and "new run" in message
    assert not marker.exists()


def test_a_symlinked_checkpoint_file_is_refused(tiny_models, tmp_path):
    run = tmp_path / "run"
    _run(tiny_models, run, steps=5)
    state = run / "checkpoints" / "last" / "state.json"
    outside = tmp_path / "outside.json"
    outside.write_text(state.read_text())
    state.unlink()
    state.symlink_to(outside)
    with pytest.raises(TrainingError, match="state.json"):
        _run(tiny_models, run, steps=10)


def test_a_damaged_checkpoint_is_one_line(tiny_models, tmp_path):
    run = tmp_path / "run"
    _run(tiny_models, run, steps=5)
    (run / "checkpoints" / "last" / "optim.json").write_text("{not json")
    with pytest.raises(TrainingError, match="is damaged") as caught:
        _run(tiny_models, run, steps=10)
    assert "\n" not in str(caught.value)


def test_resumed_run_repeats_the_uninterrupted_steps_and_losses(tiny_models, tmp_path, monkeypatch):
    straight = _run(tiny_models, tmp_path / "straight", steps=14)
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def interrupt_at_step_8(*args, **kwargs):  # after the checkpoint at step 5
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", interrupt_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_models, tmp_path / "resumed", steps=14)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real)
    torch.manual_seed(1234)  # a resume must not depend on the RNG it finds
    np.random.seed(1234)
    resumed = _run(tiny_models, tmp_path / "resumed", steps=14)
    assert resumed.resumed_from == 5 and resumed.steps == straight.steps == 14
    rows = [(r["step"], r["loss"], r["lr"]) for r in straight.history if "loss" in r]
    again = [(r["step"], r["loss"], r["lr"]) for r in resumed.history if "loss" in r]
    assert [r[0] for r in again] == [r[0] for r in rows] == list(range(1, 15))
    np.testing.assert_allclose([r[1:] for r in again], [r[1:] for r in rows], rtol=1e-5)


def test_optimizer_scheduler_and_rng_state_round_trip_without_pickle():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = make_scheduler(opt, "cosine", 40, 4)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    sched.step()
    sched.lr_lambdas[0].replan(1, 30)
    parts = {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
    }
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(to_json(parts, "ckpt", tensors))  # plain JSON: nothing left to pickle
    back = from_json(json.loads(text), tensors)
    assert back["optimizer"]["param_groups"] == parts["optimizer"]["param_groups"]
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # a tuple again
    for pid, fields in parts["optimizer"]["state"].items():
        for key, value in fields.items():
            torch.testing.assert_close(back["optimizer"]["state"][pid][key], value)
    assert back["scheduler"] == parts["scheduler"]
    assert torch.equal(back["torch_rng"], parts["torch_rng"])
    assert back["numpy_rng"][0] == "MT19937"
    np.testing.assert_array_equal(back["numpy_rng"][1], parts["numpy_rng"][1])
    assert back["numpy_rng"][1].dtype == parts["numpy_rng"][1].dtype
    fresh = make_scheduler(torch.optim.AdamW(model.parameters(), lr=1e-3), "linear", 5, 0)
    fresh.load_state_dict(back["scheduler"])
    assert vars(fresh.lr_lambdas[0]) == vars(sched.lr_lambdas[0])
    with pytest.raises(TypeError, match="keeps no Schedule"):
        to_json({"fn": Schedule("linear", 5, 0)}, "ckpt", {})
    with pytest.raises(ValueError, match="unknown entry"):
        from_json({"@pickle": "..."}, {})


def test_the_loop_loads_nothing_with_torch_load(monkeypatch, tiny_models, tmp_path):
    """Resuming never goes through torch.load (pickle), whatever the checkpoint holds."""

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load called while resuming")

    run = tmp_path / "run"
    _run(tiny_models, run, steps=5)
    monkeypatch.setattr(torch, "load", no_torch_load)
    monkeypatch.setattr(loop_module.torch, "load", no_torch_load)
    result = _run(tiny_models, run, steps=7)
    assert result.resumed_from == 5 and result.steps == 7
