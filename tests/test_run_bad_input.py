"""Bad input to ``peftkit run`` / ``peftkit eval`` found by adversarial testing: each is a
one-line error naming the key and where it came from (the override when one set it), given
before the base model loads where the model is not needed, and leaving no run folder; a
damaged checkpoint is refused on resume the one way damaged checkpoints are."""

from __future__ import annotations

import json
import os
import shlex

import pytest
from helpers import synthetic
from test_bad_input import assert_one_line_error, recipe, run_args, run_cli  # noqa: F401
from test_recipes import GOOD, write_data, write_recipe

from peftkit.adapters.folder import release
from peftkit.config.presets import load_preset
from peftkit.config.recipes import load_recipe
from peftkit.errors import ConfigError, TrainingError
from peftkit.models.base import load_base
from peftkit.training.train import TrainConfig, train

BIG_SEED = "99999999999999999999"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (f"training.seed={BIG_SEED}", "training.seed must be in [0, 4294967295]"),
        ("training.seed=-1", "training.seed must be in [0, 4294967295], got -1"),
        ("data.seed=-1", "data.seed must be in [0, 4294967295]"),
        ("adapter.peft.target_modules=[]", "adapter.peft.target_modules must be a non-empty"),
        ("adapter.peft.target_modules=5", "adapter.peft.target_modules must be a non-empty"),
        ("adapter.peft.target_modules=['']", "adapter.peft.target_modules must be a non-empty"),
        ("training.objective=contrastive", "adapter.head_init: prototypes"),
        ("training.eval_every=-1", "training.eval_every must be >= 1"),
        ("training.eval_every=0", "training.eval_every must be >= 1"),
        ("training.patience=-2", "training.patience must be >= 0"),
        ("data.source=''", "data.source must name a data folder"),
        ("data.source=' '", "data.source must name a data folder"),
        ("registry.tags=[1, [2]]", "registry.tags.0: must be a string"),
        ("then=[{name: ../x}]", "then.0.data: missing required key"),
    ],
)
def test_bad_values_are_refused_naming_the_override_before_work(
    recipe,  # noqa: F811
    capsys,
    reset_accelerate,
    override,
    expected,
):
    code, out, err = run_cli(run_args(recipe, override), capsys)
    assert_one_line_error(code, out, err, expected, f"(override {override!r})")
    assert "line " not in err  # the override, not the file's line, says where
    assert not recipe["run"].exists() and not recipe["reg"].exists()


def test_the_largest_seed_is_accepted(tmp_path):
    path = write_recipe(tmp_path, GOOD)
    assert load_recipe(path, ["training.seed=4294967295"]).training.seed == 2**32 - 1
    with pytest.raises(ConfigError, match=r"r\.yaml \(override 'training.seed=4294967296'\)"):
        load_recipe(path, ["training.seed=4294967296"])


def test_a_seed_in_the_file_names_its_line(tmp_path):
    path = write_recipe(tmp_path, GOOD.replace("epochs: 1", "epochs: 1\n  seed: -3"))
    with pytest.raises(ConfigError, match=r"r\.yaml, line 11: training\.seed must be"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        # no head_init at all: the recipe's check
        ("{training: {objective: contrastive}}", "then.0.training.objective: contrastive"),
        # head_init but a preset that trains no body: the plan's check
        ("{adapter: {preset: probe, head_init: prototypes}, training: {objective: contrastive}}",
         "then: t2: training.objective: contrastive"),
    ],
)  # fmt: skip
def test_every_then_task_is_checked_before_the_first_trains(
    recipe,  # noqa: F811
    capsys,
    reset_accelerate,
    task,
    expected,
):
    data = f"data: {{source: {recipe['data']}, max_rows: 20}}"
    override = f"then=[{{name: t2, {data}, {task[1:]}]"
    code, out, err = run_cli(run_args(recipe, override), capsys)
    assert_one_line_error(code, out, err, expected)
    assert not recipe["run"].exists() and not recipe["reg"].exists()  # nothing trained


def test_an_empty_registry_or_run_dir_flag_is_refused(recipe, capsys):  # noqa: F811
    for flag in ("--registry", "--run-dir"):
        argv = ["run", recipe["recipe"], "training.max_steps=2", flag, ""]
        code, out, err = run_cli(argv, capsys)
        assert_one_line_error(code, out, err, f"{flag} is empty")
    assert not (recipe["recipe"].parent / "registry").exists()


def test_target_modules_the_base_lacks_name_its_modules_and_leave_no_folder(
    recipe,  # noqa: F811
    capsys,
    reset_accelerate,
):
    override = "adapter.peft.target_modules=[nonexistent_mod]"
    code, out, err = run_cli(run_args(recipe, override), capsys)
    assert code == 1, (out, err)
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]  # after the base's loading bar
    assert err.startswith("peftkit: error: "), err
    for text in (f"(override {override!r})", "adapter.peft.target_modules", "'nonexistent_mod'",
                 "query"):  # fmt: skip
        assert text in err, (text, err)
    assert not recipe["run"].exists()  # only the base could tell; its folder is gone again
    assert not recipe["reg"].exists()  # and so is the registry that the run created


def _prompt_argv(tmp_path, tiny_models, *overrides):
    data = write_data(tmp_path / "data", ["negative", "positive"])
    return [
        "eval", "zero-shot-sst2", f"base={tiny_models['llama']}", f"data.source={data}",
        "evaluation.max_rows=4", *overrides, "--run-dir", tmp_path / "run",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["prompt.demonstrations=-1"], "prompt.demonstrations must be >= 0"),
        (["prompt.demonstrations=100000"], "prompt.demonstrations=100000 per label, but the "
         "training split is too small: 'negative' has 12, 'positive' has 12; use at most 12"),
        (["prompt.scorer=embedding", "prompt.demonstrations=2"],
         "the embedding scorer takes no demonstrations"),
    ],
)  # fmt: skip
def test_prompt_demonstrations_are_checked_before_the_model(
    tmp_path, tiny_models, capsys, overrides, expected
):
    code, out, err = run_cli(_prompt_argv(tmp_path, tiny_models, *overrides), capsys)
    assert_one_line_error(code, out, err, expected, f"(override {overrides[-1]!r})")
    assert not (tmp_path / "run").exists()


def test_auto_scorer_without_demonstrations_is_refused_before_the_model(
    tmp_path, tiny_models, capsys, monkeypatch
):
    """``prompt.scorer: auto`` picks by the base's kind, which its config tells: an encoder
    gets the embedding scorer, which takes no demonstrations."""
    import peftkit.models.base

    def never(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(peftkit.models.base, "load_base", never)
    override = "prompt.demonstrations=2"
    argv = _prompt_argv(tmp_path, tiny_models, f"base={tiny_models['bert']}", "prompt.scorer=auto",
                        override)  # fmt: skip
    code, out, err = run_cli(argv, capsys)
    assert_one_line_error(code, out, err, f"(override {override!r})",
                          "the embedding scorer takes no demonstrations", "an encoder")  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("base", "scorer", "expected"),
    [
        ("bert", "masked-lm", "the masked-lm scorer needs a base with a masked-LM head"),
        ("bert", "causal", "the causal scorer needs a causal LM"),
        ("llama", "masked-lm", "the masked-lm scorer needs a base with a masked-LM head"),
    ],
)
def test_a_scorer_the_base_cannot_run_is_refused_before_the_model(
    tmp_path, tiny_models, capsys, monkeypatch, base, scorer, expected
):
    import peftkit.models.base

    def never(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(peftkit.models.base, "load_base", never)
    override = f"prompt.scorer={scorer}"
    argv = _prompt_argv(tmp_path, tiny_models, f"base={tiny_models[base]}", override)
    code, out, err = run_cli(argv, capsys)
    assert_one_line_error(code, out, err, f"(override {override!r})", expected)
    assert not (tmp_path / "run").exists()


# --- damaged checkpoints ----------------------------------------------------------------------

QUICK = dict(batch_size=8, progress=False, eval_every=1000, patience=None, checkpoint_every=5)


def _train(base, run_dir, steps: int = 5):
    config = TrainConfig(max_steps=steps, log_every=1, **QUICK)
    result = train(base, load_preset("lora"), synthetic("sentiment", n=48), config, run_dir)
    release(result.model)


def _state(path, **changes):
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, **changes}))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda last: (last / "trainable.safetensors").write_bytes(bytes(range(256)) * 8),
         "trainable.safetensors: SafetensorError"),
        (lambda last: (last / "optim.safetensors").write_bytes(b""),
         "optim.safetensors"),
        (lambda last: _state(last / "state.json", step="five"),
         "step must be a whole number >= 0, got 'five'"),
        (lambda last: _state(last / "state.json", step=-1), "step must be a whole number >= 0"),
        (lambda last: _state(last / "state.json", step=10**30), "is past this run's 5 steps"),
        (lambda last: _state(last / "state.json", history="none"), "history must be a list"),
        (lambda last: _state(last / "state.json", best_metric="x"), "best_metric must be a number"),
        (lambda last: (last / "state.json").write_text("[1, 2]"), "state.json is not a mapping"),
    ],
)  # fmt: skip
def test_a_damaged_checkpoint_is_refused_on_resume(tiny_models, tmp_path, damage, expected):
    base = load_base(tiny_models["bert"])
    run = tmp_path / "run"
    _train(base, run)
    last = run / "checkpoints" / "last"
    damage(last)
    with pytest.raises(TrainingError) as err:
        _train(base, run)
    message = str(err.value)
    assert f"checkpoint {last} is damaged" in message and expected in message, message
    assert f"delete {last.parent} to train this run again" in message
    assert len(message.splitlines()) == 1


# --- interruption ---------------------------------------------------------------------------


def test_ctrl_c_says_interrupted_once_with_a_command_that_pastes(capsys, monkeypatch, tmp_path):
    import peftkit.run.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("at step 3; the last checkpoint is in x/checkpoints/last")

    monkeypatch.setattr(peftkit.run.pipeline, "run_recipe", interrupted)
    recipe_path = write_recipe(tmp_path, GOOD)
    folder = tmp_path / "my run"
    argv = ["run", recipe_path, "then=[]", "--run-dir", folder, "--registry", "reg",
            "--overwrite"]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 130
    assert err.count("peftkit: interrupted") == 1 and len(err.strip().splitlines()) == 1, err
    assert "at step 3; the last checkpoint is in x/checkpoints/last" in err
    command = err.strip().split("run: ", 1)[1]
    expected = ["peftkit", "run", str(recipe_path), "then=[]", "--run-dir", str(folder),
                "--registry", "reg"]  # fmt: skip
    assert shlex.split(command) == expected  # --overwrite never comes back


def test_an_override_that_replaces_a_block_is_named_not_the_files_line(tmp_path):
    text = GOOD + "registry:\n  tags: [a, b]\nthen:\n  - name: t2\n    data: bbc-news\n"
    path = write_recipe(tmp_path, text)
    for override, expected in (
        ("then=[{name: t3}]", "(override 'then=[{name: t3}]'): then.0.data: missing required"),
        ("registry.tags=[1, [2]]", "(override 'registry.tags=[1, [2]]'): registry.tags.0:"),
    ):
        with pytest.raises(ConfigError) as err:
            load_recipe(path, [override])
        assert expected in str(err.value) and "line " not in str(err.value), str(err.value)
    # a key the override left alone keeps its line
    with pytest.raises(ConfigError, match=r"r\.yaml, line 14: then\.0\.name: invalid name"):
        load_recipe(write_recipe(tmp_path, text.replace("name: t2", "name: ../t2")))


def test_an_interrupted_loop_says_where_it_stopped_once(tiny_models, tmp_path, monkeypatch, capsys):
    import peftkit.training.loop as loop_module

    def stop(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_module.TrainLoop, "_after_step", stop)
    with pytest.raises(KeyboardInterrupt) as err:
        _train(load_base(tiny_models["bert"]), tmp_path / "run")
    # no checkpoint written yet: it says so rather than naming a folder that holds none
    assert str(err.value) == "at step 0, before the first checkpoint (resuming starts over)"
    assert "interrupted" not in capsys.readouterr().err  # the CLI says it, once


def test_unmaking_a_refused_run_folder_leaves_what_another_run_wrote(tmp_path):
    """A run refused after the base loaded removes only its own files and the folders it
    made that are empty then: a sibling run under the ``runs/`` it created stays."""
    from peftkit.run.folders import LOCK_FILE, RUN_FILE
    from peftkit.run.prepare import own_files, unmake

    runs = tmp_path / "runs"
    mine, theirs = runs / "mine", runs / "theirs"
    mine.mkdir(parents=True)
    theirs.mkdir()
    for name in (RUN_FILE, LOCK_FILE):
        (mine / name).write_text("x")
    (theirs / RUN_FILE).write_text("their run")
    own = own_files(mine)
    unmake(mine, runs, own)
    _close(own)
    assert not mine.exists()
    assert (theirs / RUN_FILE).read_text() == "their run"
    # a file it did not write keeps its folder
    (mine / "notes.txt").parent.mkdir()
    (mine / RUN_FILE).write_text("x")
    own = own_files(mine)
    (mine / "notes.txt").write_text("keep")
    unmake(mine, runs, own)
    _close(own)
    assert (mine / "notes.txt").read_text() == "keep" and not (mine / RUN_FILE).exists()


def test_unmaking_leaves_a_file_put_in_place_of_one_the_run_wrote(tmp_path):
    """Only the very files the run wrote go: a user's file moved in under one of their
    names (another inode), or a link there, stays."""
    from peftkit.run.folders import LOG_FILE, RUN_FILE
    from peftkit.run.prepare import own_files, unmake

    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    for name in (RUN_FILE, LOG_FILE):
        (run / name).write_text("x")
    own = own_files(run)
    precious = tmp_path / "precious.log"
    precious.write_text("the user's log\n")
    (run / LOG_FILE).unlink()
    (run / LOG_FILE).write_text("the user's own run.log\n")  # a new file, a new inode
    (run / RUN_FILE).unlink()
    (run / RUN_FILE).symlink_to(precious)
    unmake(run, tmp_path / "runs", own)
    _close(own)
    assert (run / LOG_FILE).read_text() == "the user's own run.log\n"
    assert (run / RUN_FILE).is_symlink() and precious.read_text() == "the user's log\n"


def _close(own: dict[str, int]) -> None:
    for fd in own.values():
        os.close(fd)
