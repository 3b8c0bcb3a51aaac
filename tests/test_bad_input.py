"""Bad input through the ``peftkit`` command, as a user types it: every case exits 1 with
one line ``peftkit: error: ...`` naming what and where, before a model is loaded, and
leaves nothing behind (no run folder, nothing outside the folders it was given)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_recipes import GOOD, write_data, write_recipe

from peftkit import cli


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *expected: str) -> None:
    assert code == 1, (code, out, err)
    assert err.startswith("peftkit: error: "), err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "loading base" not in out, (out, err)
    for text in expected:
        assert text in err, (text, err)


@pytest.fixture()
def recipe(tmp_path, tiny_models) -> dict[str, Path]:
    """A tiny recipe, its data, and the folders a run writes, all under tmp_path."""
    data = write_data(tmp_path / "data", ["negative", "positive"])
    text = GOOD.replace("base: minilm", f"base: {tiny_models['bert']}")
    text = text.replace("source: bbc-news", f"source: {data}")
    return {
        "recipe": write_recipe(tmp_path, text),
        "data": data,
        "run": tmp_path / "run",
        "reg": tmp_path / "reg",
    }


def run_args(paths, *overrides) -> list:
    return [
        "run", paths["recipe"], "training.max_steps=2", "training.batch_size=8", *overrides,
        "--run-dir", paths["run"], "--registry", paths["reg"],
    ]  # fmt: skip


# --- refused before any work, leaving no run folder --------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("registry.name=../../etc", "registry.name: invalid name '../../etc'"),
        ("registry.name=a/b", "invalid name 'a/b'"),
        ("registry.name=" + "x" * 200, "at most 128 characters"),
        ("registry.name=café", "invalid name 'café'"),
        ("name=../../../tmp/x", "name: invalid name '../../../tmp/x'"),
        ("data.labels=['', pos]", "data.labels must be non-empty names"),
        ("data.max_rows=0", "data.max_rows must be >= 1"),
        ("data.split_ratios=[0.5, 0.5]", "data.split_ratios must be three numbers"),
        ("data.text_field=body", "body"),
        ("data.label_field=category", "category"),
        ("adapter=lorra", "unknown adapter preset 'lorra'"),
        ("adapter.peft.rank=4", "rank"),
        ("adapter.peft.r=0", "r"),
        ("adapter.learning_rate=.nan", "learning_rate"),
        ("adapter.learning_rate=-1", "learning_rate"),
        ("training.metric=acuracy", "training.metric"),
        ("training.epochs=.inf", "(override 'training.epochs=.inf'): training.epochs"),
        ("training.epochs=.nan", "must be a finite number"),
        ("training.batch_size=0", "(override 'training.batch_size=0')"),
        ("training.epochs=-1", "training.epochs must be > 0"),
        ("base=no-such-model", "unknown model source 'no-such-model'"),
        ("base=/no/such/folder", "/no/such/folder"),
    ],
)
def test_bad_recipe_input_is_refused_before_work(
    recipe, capsys, reset_accelerate, override, expected
):
    code, out, err = run_cli(run_args(recipe, override), capsys)
    assert_one_line_error(code, out, err, expected)
    assert not recipe["run"].exists()  # a refused run leaves no run folder


@pytest.mark.parametrize("override", ["adapter.peft.r=0", "adapter.learning_rate=-1"])
def test_a_preset_error_names_the_override_that_set_the_value(recipe, capsys, override):
    code, out, err = run_cli(run_args(recipe, override), capsys)
    assert_one_line_error(code, out, err, "lora.yaml", f"(override {override!r})")


def test_a_preset_or_prompt_file_with_a_key_given_twice_is_refused(recipe, tmp_path, capsys):
    preset = tmp_path / "mine.yaml"
    preset.write_text("method: lora\nlearning_rate: 1e-3\nlearning_rate: 1e-1\n")
    code, out, err = run_cli(run_args(recipe, f"adapter={preset}"), capsys)
    assert_one_line_error(code, out, err, "mine.yaml, line 3", "'learning_rate' is given twice")
    from peftkit.errors import ConfigError
    from peftkit.prompting.templates import parse_prompt_set

    with pytest.raises(ConfigError, match="'family' is given twice"):
        parse_prompt_set("family: a\nfamily: b\n", "p.yaml")


def test_an_override_error_names_the_override_not_the_file_line(recipe, capsys):
    code, out, err = run_cli(run_args(recipe, "training.batch_size=0"), capsys)
    assert_one_line_error(code, out, err, "(override 'training.batch_size=0')")
    assert "line " not in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"base: minilm\n\xff\xfe: 1\n", "is not UTF-8"),
        (b"base: minilm\ndata: x\ndata: y\n", "key 'data' is given twice (first on line 2)"),
        (b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n",
         "aliases (*a) are not allowed"),
    ],
)  # fmt: skip
def test_unreadable_recipe_files_are_one_line(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    code, out, err = run_cli(["run", path], capsys)
    assert_one_line_error(code, out, err, str(path), expected)


def test_alias_bomb_is_refused_at_once(tmp_path, capsys):
    """A kilobyte of nested aliases expanded until MemoryError; now the first alias stops it."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(["run", path], capsys)
    assert_one_line_error(code, out, err, "line 2", "aliases (*a0) are not allowed")


# --- folders it did not write are never destroyed ------------------------------------------


def test_overwrite_refuses_a_folder_that_is_not_a_run(recipe, tmp_path, capsys):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    argv = run_args(recipe)
    argv[argv.index("--run-dir") + 1] = precious
    code, out, err = run_cli([*argv, "--overwrite"], capsys)
    assert_one_line_error(code, out, err, "not one", "chapter1.tex", "nothing was deleted")
    assert (precious / "chapter1.tex").read_text() == "years of work"


def test_overwrite_refuses_a_registry(recipe, capsys, reset_accelerate):
    assert run_cli(run_args(recipe), capsys)[0] == 0
    argv = run_args(recipe)
    argv[argv.index("--run-dir") + 1] = recipe["reg"]
    code, out, err = run_cli([*argv, "--overwrite"], capsys)
    assert_one_line_error(code, out, err, "not one")
    assert list(recipe["reg"].rglob("*.safetensors"))


def test_overwrite_with_a_bad_override_deletes_nothing(recipe, capsys, reset_accelerate):
    assert run_cli(run_args(recipe), capsys)[0] == 0
    before = sorted(p.name for p in recipe["run"].iterdir())
    code, out, err = run_cli([*run_args(recipe, "training.epochs=fast"), "--overwrite"], capsys)
    assert_one_line_error(code, out, err, "training.epochs")
    assert sorted(p.name for p in recipe["run"].iterdir()) == before


def test_overwrite_replaces_only_what_a_run_wrote(recipe, capsys, reset_accelerate):
    assert run_cli(run_args(recipe), capsys)[0] == 0
    (recipe["run"] / "my-notes.txt").write_text("mine")
    code, out, err = run_cli([*run_args(recipe), "--overwrite"], capsys)
    assert_one_line_error(code, out, err, "my-notes.txt")
    (recipe["run"] / "my-notes.txt").unlink()
    code, out, err = run_cli([*run_args(recipe), "--overwrite"], capsys)
    assert code == 0, err
    assert (recipe["run"] / "metrics.json").is_file()


def test_listing_a_lost_index_deletes_nothing_and_says_how_to_recover(
    recipe, capsys, reset_accelerate
):
    assert run_cli(run_args(recipe), capsys)[0] == 0
    (recipe["reg"] / "index.sqlite").write_bytes(b"")  # a backup without its -wal
    for extra in ("index.sqlite-wal", "index.sqlite-shm"):
        (recipe["reg"] / extra).unlink(missing_ok=True)
    weights = sorted(recipe["reg"].rglob("*.safetensors"))
    code, out, err = run_cli(["adapters", "--registry", recipe["reg"], "list"], capsys)
    assert code == 0 and "not in its index (r@1)" in err and "adapters rebuild" in err, err
    assert sorted(recipe["reg"].rglob("*.safetensors")) == weights
    assert run_cli(["adapters", "--registry", recipe["reg"], "rebuild"], capsys)[0] == 0
    code, out, err = run_cli(["adapters", "--registry", recipe["reg"], "list"], capsys)
    assert code == 0 and "r@1" in out


def test_run_dir_that_is_a_file_is_refused(recipe, capsys):
    recipe["run"].write_text("not a folder")
    code, out, err = run_cli(run_args(recipe), capsys)
    assert_one_line_error(code, out, err, "is a file, not a folder")
    assert recipe["run"].read_text() == "not a folder"


def test_a_run_folder_in_use_is_refused_naming_its_holder(recipe, capsys):
    from peftkit.run.folders import lock_run_dir

    with lock_run_dir(recipe["run"]):
        code, out, err = run_cli(run_args(recipe), capsys)
    assert_one_line_error(code, out, err, "is in use by another run", f"pid {os.getpid()}")


# --- predict -----------------------------------------------------------------------------


def test_predict_input_errors_come_before_the_model(tmp_path, capsys):
    (tmp_path / "reg").mkdir()
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    base = ["predict", "--adapter", "x", "--registry", tmp_path / "reg"]
    code, out, err = run_cli([*base, "--file", bad], capsys)
    assert_one_line_error(code, out, err, f"--file {bad}: not UTF-8 text (byte 3")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a", "text_pair": "b"}\n{"text": "c"}\n')
    code, out, err = run_cli([*base, "--file", mixed], capsys)
    assert_one_line_error(code, out, err, "some rows carry a 'text_pair'")


@pytest.mark.parametrize("size", ["0", "-3", "many"])
def test_predict_batch_size_below_one_is_a_usage_error(tmp_path, capsys, size):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", "--adapter", "x", "--batch-size", size, "t"])
    assert exit_.value.code == 2
    assert "--batch-size" in capsys.readouterr().err


def test_predict_with_stdin_closed_is_one_line(tmp_path):
    (tmp_path / "reg").mkdir()
    cmd = [sys.executable, "-m", "peftkit.cli", "predict", "--adapter", "x",
           "--registry", str(tmp_path / "reg")]  # fmt: skip
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("peftkit: error: no texts")
    closed = subprocess.run(
        cmd, capture_output=True, text=True, preexec_fn=lambda: os.close(0)
    )  # stdin closed altogether
    assert closed.returncode == 1 and "Traceback" not in closed.stderr, closed.stderr
    assert closed.stderr.startswith("peftkit: error: no texts")


# --- resumed registration: one entry, even after a kill between commit and record -------


def test_a_run_killed_after_registering_does_not_register_twice(
    recipe, capsys, reset_accelerate, monkeypatch
):
    from peftkit.registry.store import Registry
    from peftkit.run import pipeline

    real = pipeline.write_json

    def killed(path, data):
        if Path(path).name == "registered.json":
            raise KeyboardInterrupt  # as kill -9 right after the registry's commit
        return real(path, data)

    monkeypatch.setattr(pipeline, "write_json", killed)
    code, _, err = run_cli(run_args(recipe), capsys)
    assert code == 130, err
    monkeypatch.setattr(pipeline, "write_json", real)
    assert [e.ref for e in Registry(recipe["reg"]).list()] == ["r@1"]
    code, out, err = run_cli(run_args(recipe), capsys)
    assert code == 0, err
    assert "already registered as r@1" in out
    assert [e.ref for e in Registry(recipe["reg"]).list()] == ["r@1"]
    done = json.loads((recipe["run"] / "registered.json").read_text())
    assert done["ref"] == "r@1"


# --- new data works the first time -----------------------------------------------------------


def test_prototype_prompt_for_other_labels_names_the_key_before_loading(
    tmp_path, tiny_models, capsys
):
    data = write_data(tmp_path / "data", ["joy", "anger", "fear"])
    argv = [
        "run", "few-shot-sst2-prototypes", f"base={tiny_models['bert']}", f"data.source={data}",
        "--run-dir", tmp_path / "run", "--registry", tmp_path / "reg",
    ]  # fmt: skip
    code, out, err = run_cli(argv, capsys)
    assert_one_line_error(code, out, err, "adapter.head_init.prompt: 'sentiment'", "'joy'")
    assert "adapter.head_init.prompt=null" in err
    assert not (tmp_path / "run").exists()


def test_zero_shot_scores_a_test_only_folder_and_names_the_run_after_its_data(
    tmp_path, tiny_models, capsys, reset_accelerate, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    data = write_data(tmp_path / "emotions", ["negative", "positive"])
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").unlink()
    argv = [
        "eval", "zero-shot-sst2", f"base={tiny_models['llama']}", f"data.source={data}",
        "evaluation.max_rows=4", "evaluation.batch_size=4",
    ]  # fmt: skip
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    (run,) = Path("runs").iterdir()
    assert run.name.startswith("zero-shot-sst2-emotions-")
    assert "== zero-shot-sst2-emotions" in out
    assert json.loads((run / "metrics.json").read_text())["data"] == "emotions"


def test_rows_with_pairs_train_on_pairs_and_say_so(recipe, capsys, reset_accelerate):
    for split in ("train", "validation", "test"):
        path = recipe["data"] / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "text_pair": "a film"}) + "\n" for r in rows))
    code, out, err = run_cli(run_args(recipe), capsys)
    assert code == 0, err
    assert "labels, text pairs)" in out


def test_max_length_beyond_the_model_trains_registers_and_serves_long_texts(
    recipe, tiny_models, capsys, reset_accelerate
):
    from transformers import AutoConfig

    positions = AutoConfig.from_pretrained(tiny_models["bert"]).max_position_embeddings
    code, out, err = run_cli(run_args(recipe, "training.max_length=100000"), capsys)
    assert code == 0, err
    task = json.loads((recipe["reg"] / "adapters" / "r" / "1" / "task.json").read_text())
    assert task["max_length"] == positions
    long_text = " ".join(["good movie"] * (4 * positions))
    argv = ["predict", "--adapter", "r", "--registry", recipe["reg"], long_text]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert json.loads(out)["label"] in ("negative", "positive")


# --- adapters promote: refused in one line before any model loads -------------------------


def _promote_registry(tmp_path) -> tuple[Path, Path]:
    """A registry with two versions of 'sst2' (sst2@production -> sst2@1) and test data."""
    from test_registry_lineage import peftkit_folder

    from peftkit.registry.store import Registry

    reg = Registry(tmp_path / "reg")
    reg.register("sst2", peftkit_folder(tmp_path / "a", 0))
    reg.register("sst2", peftkit_folder(tmp_path / "b", 1))
    reg.alias("sst2@1", "production")
    data = write_data(tmp_path / "data", ["neg", "pos"])
    return reg.root, data


@pytest.mark.parametrize(
    ("ref", "gate", "expected"),
    [
        ("sst2@7", "accuracy on {data} >= alias", "no version 7"),
        ("sst2@2", "accuracy {data} >= alias", "cannot read gate"),
        ("sst2@2", "acuracy on {data} >= alias", "did you mean 'accuracy'"),
        ("sst2@2", "accuracy on {data} >= boss", "cannot read the bound 'boss'"),
        ("sst2@2", "accuracy on {data}/nope >= 0.5", "does not exist"),
        ("sst2@2", "accuracy on bbc-news >= 0.5", "do not match sst2@2's"),
        ("sst2@2", "accuracy on {data} >= 0.5", "does not record its base model's source"),
    ],
)
def test_promote_bad_input_is_one_line_before_loading(tmp_path, capsys, ref, gate, expected):
    root, data = _promote_registry(tmp_path)
    argv = ["adapters", "--registry", root, "promote", ref, "--alias", "production"]
    code, out, err = run_cli([*argv, "--gate", gate.format(data=data)], capsys)
    assert_one_line_error(code, out, err, expected)
    from peftkit.registry.store import Registry

    reg = Registry(root)
    assert reg.promotions("sst2") == [] and reg.get("sst2@production").ref == "sst2@1"


def test_a_tracker_whose_library_is_missing_names_its_extra(recipe, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    code, out, err = run_cli(run_args(recipe, "training.log_with=mlflow"), capsys)
    assert_one_line_error(code, out, err, "log_with: mlflow", "pip install 'peftkit[mlflow]'")
    assert not recipe["run"].exists()
