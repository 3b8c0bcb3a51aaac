"""Every command in README.md's ```bash blocks (and its ```python blocks) runs, so the README
never drifts. Recipes are pointed at tiny models and tiny data with overrides appended to the
command; the real quickstart (packaged MiniLM, shortened) and the 2-process launch are slow."""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_recipes import write_data

from peftkit import cli
from peftkit.config.recipes import load_recipe
from peftkit.registry.store import Registry

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), flags=re.S)


def commands() -> list[list[str]]:
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def tiny(recipe_name: str, root: Path, models) -> list[str]:
    """Overrides that run a recipe for 2 steps on a tiny model and tiny data in ``root``."""
    recipe = load_recipe(recipe_name)
    if recipe.prompt is not None:
        from peftkit.prompting.templates import load_prompt_set

        labels = load_prompt_set(recipe.prompt.set).labels
        data = write_data(root / f"data-{recipe_name}", labels, n_train=8 * len(labels))
        out = [f"base={models['llama']}", "evaluation.max_rows=4", "evaluation.batch_size=4"]
        if recipe.prompt.demonstrations:
            out.append("prompt.demonstrations=1")
    else:
        data = write_data(root / f"data-{recipe_name}", ["negative", "positive"])
        out = [f"base={models['bert']}", "training.max_steps=2", "training.batch_size=8"]
        for i in range(len(recipe.then)):
            other = write_data(root / f"data-{recipe_name}-{i}", ["ham", "spam"])
            out += [f"then.{i}.data.source={other}", f"then.{i}.training.max_steps=2"]
    return [*out, f"data.source={data}"]


def test_readme_starts_with_the_two_commands():
    first = commands()[:2]
    assert first == [["make", "quickstart"], ["make", "test"]]
    assert all(words[0] in ("make", "peftkit", "accelerate") for words in commands())


def test_every_readme_command_runs(tmp_path, tiny_models, monkeypatch, capsys, reset_accelerate):
    monkeypatch.chdir(tmp_path)
    ran = 0
    for words in commands():
        if words == ["make", "test"] or words[0] == "accelerate":
            continue  # the suite itself; the launch is test_readme_multi_process_launch
        if words == ["make", "quickstart"]:
            words = ["peftkit", "run", "quickstart"]
        args = [a for w in words[1:] for a in (sorted(glob.glob(w)) if "*" in w else [w])]
        if args[0] in ("run", "eval"):
            args += tiny(args[1], tmp_path, tiny_models)
        code = cli.main(args)
        out, err = capsys.readouterr()
        assert code == 0, f"{' '.join(words)} -> {code}: {err}"
        ran += 1
    assert ran >= 15
    # the Python tour runs against the registry the commands above filled
    sentiment = write_data(tmp_path / "data-sentiment", ["negative", "positive"])
    for block in blocks("python"):
        code = block.replace('"minilm"', repr(str(tiny_models["bert"])))
        code = code.replace('"smollm2-135m"', repr(str(tiny_models["llama"])))
        code = code.replace('"../shared/data/sst2"', repr(str(sentiment)))
        code = code.replace("max_steps=300", "max_steps=2")  # a tiny model learns nothing more
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "('negative', 'positive')" in out  # the trained model's task, printed
    assert Registry(tmp_path / "registry").get("sst2-py").method == "lora"
    assert "quickstart-spam" in out
    assert "mean ± std" in out and (tmp_path / "runs/sst2-zero-shot/predictions.jsonl").is_file()


@pytest.mark.slow
def test_readme_multi_process_launch(tmp_path, tiny_models):
    (launch,) = [w for w in commands() if w[0] == "accelerate"]
    assert launch[:2] == ["accelerate", "launch"] and "-m" in launch
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch[2:]]
    cmd += tiny(launch[launch.index("run") + 1], tmp_path, tiny_models)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "runs").iterdir())) == 1
    assert proc.stdout.count("macro avg") == 1


@pytest.mark.slow
@pytest.mark.real
def test_quickstart_on_the_packaged_model(tmp_path, monkeypatch, capsys, reset_accelerate):
    """The real quickstart recipe (MiniLM, BBC News, SMS spam), cut to a few steps."""
    monkeypatch.chdir(tmp_path)
    code = cli.main(
        [
            "run",
            "quickstart",
            "training.max_steps=3",
            "data.max_rows=48",
            "then.0.data.max_rows=48",
            "then.0.training.max_steps=2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "registered quickstart@1" in out and "registered quickstart-spam@1" in out
    assert "use()" in out
    # the mixed batch: one line per text, rows alternating between the two adapters
    assert out.count("  quickstart-spam@1 ") == 3 and out.count("  quickstart@1 ") == 3
