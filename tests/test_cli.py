"""The ``peftkit`` command: exit codes, one-line errors, run, adapters, predict, compare."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_recipes import GOOD, write_data, write_recipe

from peftkit import cli


@pytest.fixture()
def trained(tmp_path_factory, tiny_models):
    """One tiny run (folder + registry), shared by the read-only tests of this module."""
    root = tmp_path_factory.mktemp("cli")
    data = write_data(root / "data", ["negative", "positive"])
    recipe = write_recipe(root, GOOD.replace("base: minilm", f"base: {tiny_models['bert']}"))
    args = [
        "run",
        str(recipe),
        f"data.source={data}",
        "training.max_steps=2",
        "training.batch_size=8",
        "registry.tags=[tiny]",
        "--run-dir",
        str(root / "run1"),
        "--registry",
        str(root / "reg"),
    ]
    return root, args


def run_cli(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_run_then_adapters_predict_compare(trained, capsys, monkeypatch, reset_accelerate):
    root, args = trained
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "macro avg" in out and "registered r@1" in out
    reg = ["--registry", root / "reg"]

    code, out, _ = run_cli(["adapters", *reg, "list"], capsys)
    assert code == 0 and "r@1" in out and "lora" in out and "tiny" in out
    code, out, _ = run_cli(["adapters", *reg, "show", "r"], capsys)
    shown = json.loads(out)
    assert shown["name"] == "r" and shown["labels"] == ["negative", "positive"]
    assert Path(shown["base"]["source"]).is_dir()  # the tiny model folder predict loads
    assert shown["adapter"]["pooling"] and shown["adapter"]["start"] is None  # plain LoRA

    code, out, _ = run_cli(["predict", "--adapter", "r", *reg, "good movie", "bad film"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["text"] for r in rows] == ["good movie", "bad film"]
    assert all(r["label"] in ("negative", "positive") and r["adapter"] == "r" for r in rows)
    assert abs(sum(rows[0]["probs"].values()) - 1) < 1e-5

    texts = root / "texts.jsonl"
    texts.write_text('{"text": "great game"}\nplain line\n\n')
    code, out, _ = run_cli(["predict", "--adapter", "r@1", *reg, "--file", texts], capsys)
    assert [json.loads(x)["text"] for x in out.splitlines()] == ["great game", "plain line"]
    code, out, _ = run_cli(
        ["predict", "--adapter", "r", *reg], capsys, stdin="a\nb\nc\n", monkeypatch=monkeypatch
    )
    assert len(out.splitlines()) == 3

    code, out, _ = run_cli(["adapters", *reg, "export", "r", root / "export"], capsys)
    assert code == 0 and (root / "export" / "adapter_config.json").is_file()
    code, out, _ = run_cli(["adapters", *reg, "import", root / "export", "--name", "copy"], capsys)
    assert code == 0 and "copy@1" in out
    code, out, _ = run_cli(["adapters", *reg, "rm", "copy"], capsys)
    assert code == 0 and "removed copy@1" in out

    # A second run into an existing finished folder: one-line error, exit 1, no traceback.
    code, out, err = run_cli(args, capsys)
    assert code == 1 and err.startswith("peftkit: error: run folder") and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err

    code, _, err = run_cli([*args[:-4], "--run-dir", root / "run2", *args[-2:]], capsys)
    assert code == 0, err
    code, out, _ = run_cli(["compare", root / "run1", root / "run2"], capsys)
    lines = out.splitlines()
    assert code == 0 and "macro-F1" in lines[0] and "trainable params" in lines[0]
    assert lines[2].startswith("run1") and lines[3].startswith("run2") and "lora" in lines[2]
    code, out, _ = run_cli(["compare", "--json", root / "run1"], capsys)
    assert json.loads(out)[0]["method"] == "lora"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "quickstrat"], "unknown recipe 'quickstrat'"),
        (["run", "quickstart", "training.epoch=1"], "did you mean 'epochs'"),
        (["run", "quickstart", "training.epochs=abc"], "must be a number"),
        (["eval", "quickstart"], "'peftkit eval' runs prompt recipes"),
        (["adapters", "--registry", "/nonexistent/reg", "list"], "no registry at"),
        (["compare", "/nonexistent/run"], "not a finished run folder"),
        (["recipes", "show", "nope"], "unknown recipe 'nope'"),
        (["presets", "show", "lorra"], "did you mean 'lora'"),
    ],
)
def test_bad_input_is_one_line_on_stderr(argv, expected, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 1 and out == ""
    assert err.startswith("peftkit: error: ") and expected in err
    assert len(err.strip().splitlines()) == 1


def test_predict_needs_texts(capsys, monkeypatch, tmp_path):
    (tmp_path / "reg").mkdir()
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    code, _, err = run_cli(["predict", "--adapter", "x", "--registry", tmp_path / "reg"], capsys)
    assert code == 1 and "no texts" in err


def test_libraries_list_and_show(capsys):
    code, out, _ = run_cli(["recipes", "list"], capsys)
    assert code == 0 and out.splitlines()[0].split()[0] in out and "quickstart" in out
    code, out, _ = run_cli(["presets", "list"], capsys)
    assert {"lora", "qlora", "probe"} <= {line.split()[0] for line in out.splitlines()}
    code, out, _ = run_cli(["prompts", "list"], capsys)
    assert "sentiment" in out
    code, out, _ = run_cli(["recipes", "show", "quickstart"], capsys)
    assert out.startswith("# peftkit run quickstart")


def test_ctrl_c_exits_130_with_resume_hint(capsys, monkeypatch, tmp_path):
    import peftkit.run.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(peftkit.run.pipeline, "run_recipe", interrupted)
    recipe = write_recipe(tmp_path, GOOD)
    code, _, err = run_cli(["run", recipe, "training.epochs=2"], capsys)
    assert code == 130
    assert f"to resume from the last checkpoint, run: peftkit run {recipe} training.epochs=2" in err
    # the folders it was given come back in the hint; --overwrite never does
    folder = tmp_path / "my run"
    argv = ["run", recipe, "--run-dir", str(folder), "--registry", "reg", "--overwrite"]
    code, _, err = run_cli(argv, capsys)
    assert code == 130
    assert f"run: peftkit run {recipe} --run-dir '{folder}' --registry reg" in err
    assert "--overwrite" not in err


def test_sigterm_ends_a_run_as_ctrl_c_does(capsys, monkeypatch, tmp_path):
    """A scheduler's SIGTERM: exit 130 with the resume hint, and the handler is put back."""
    import signal
    import time

    import peftkit.run.pipeline

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(peftkit.run.pipeline, "run_recipe", terminated)
    before = signal.getsignal(signal.SIGTERM)
    recipe = write_recipe(tmp_path, GOOD)
    code, _, err = run_cli(["run", recipe], capsys)
    assert code == 130
    assert f"run: peftkit run {recipe}" in err
    assert signal.getsignal(signal.SIGTERM) is before


def test_offline_by_default_unless_set(capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    run_cli(["presets", "list"], capsys)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    run_cli(["presets", "list"], capsys)
    assert os.environ["HF_HUB_OFFLINE"] == "0"


def test_console_script_exit_codes():
    exe = Path(sys.executable).with_name("peftkit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "peftkit.cli"]
    ok = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "run" in ok.stdout and "predict" in ok.stdout
    bad = subprocess.run(
        [*cmd, "run", "no-such-recipe"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    usage = subprocess.run([*cmd, "frobnicate"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2


def test_run_log_keeps_warnings_on_the_terminal(tmp_path, capsys, monkeypatch):
    import logging

    from peftkit.run.folders import run_log

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # logging not configured
    with run_log(tmp_path):
        logging.getLogger("peftkit.training.train").warning("the model has collapsed to one label")
        logging.getLogger("peftkit.training.train").info("evaluated")
    logging.getLogger("peftkit.training.train").warning("after the run")
    err = capsys.readouterr().err
    assert "peftkit: WARNING: the model has collapsed to one label" in err
    assert "evaluated" not in err
    log = (tmp_path / "run.log").read_text()
    assert "collapsed to one label" in log and "evaluated" in log
    assert "after the run" not in log
    assert not logging.getLogger("peftkit").handlers  # both handlers removed
