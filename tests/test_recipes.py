"""Recipes: the schema's checks and messages, overrides, and every built-in recipe run for two
steps on a tiny model (base, data and registry overridden into tmp_path)."""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from peftkit.config.library import library_dir
from peftkit.config.recipes import (
    apply_overrides,
    available_recipes,
    load_recipe,
    parse_recipe,
    recipe_to_dict,
)
from peftkit.errors import ConfigError
from peftkit.registry.store import Registry
from peftkit.run.pipeline import run_recipe

RECIPES = sorted(library_dir("recipes").glob("*.yaml"))
WORDS = "the a movie film great good bad awful market stock game team vote phone".split()


def write_data(folder: Path, labels, n_train: int = 24, n_eval: int = 8, seed: int = 0) -> Path:
    """A tiny JSONL folder (train/validation/test + labels.json) over ``labels``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        with open(folder / f"{split}.jsonl", "w") as fh:
            for i in range(n):
                words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
                fh.write(json.dumps({"text": " ".join(words), "label": labels[i % len(labels)]}))
                fh.write("\n")
    (folder / "labels.json").write_text(json.dumps(list(labels)))
    return folder


def write_recipe(folder: Path, text: str, name: str = "r.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


GOOD = """\
# peftkit run r.yaml
base: minilm
adapter:
  preset: lora
  peft: {r: 4}
data:
  source: bbc-news
  max_rows: 40
training:
  epochs: 1
"""


# --- schema -------------------------------------------------------------------------------------


def test_good_recipe_is_typed_and_frozen(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, GOOD))
    assert recipe.name == "r" and recipe.mode == "train"
    assert recipe.base.source == "minilm" and recipe.adapter.preset == "lora"
    assert recipe.adapter.overrides() == {"peft": {"r": 4}}
    assert recipe.training.epochs == 1.0 and isinstance(recipe.training.epochs, float)
    assert recipe.registry_name == "r"
    with pytest.raises(AttributeError):
        recipe.name = "x"  # type: ignore[misc]


def test_unknown_key_names_file_line_path_and_closest(tmp_path):
    path = write_recipe(tmp_path, GOOD.replace("epochs: 1", "epohcs: 1"))
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert str(path) in msg and "line 10" in msg
    assert "training.epohcs" in msg and "did you mean 'epochs'" in msg


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("max_rows: 40", "max_rows: forty"), "data.max_rows: must be an integer"),
        (("epochs: 1", "epochs: [1]"), "training.epochs: must be a number"),
        (("  source: bbc-news\n", ""), "data.source: missing required key"),
        (("base: minilm", "base: {source: minilm, quantization: 3bit}"), "not one of"),
        (("training:", "registry: {tags: oops}\ntraining:"), "registry.tags: must be a list"),
    ],
)
def test_wrong_type_or_missing_field(tmp_path, change, expected):
    path = write_recipe(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError, match=expected) as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_malformed_yaml_gives_file_and_line(tmp_path):
    path = write_recipe(tmp_path, GOOD.replace("  max_rows: 40", "  max_rows: [40"))
    with pytest.raises(ConfigError, match=r"line \d+: invalid YAML") as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_adapter_or_prompt_exactly_one(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of 'adapter'"):
        load_recipe(write_recipe(tmp_path, GOOD.replace("adapter:", "prompt: sentiment\nadapter:")))
    with pytest.raises(ConfigError, match="exactly one of 'adapter'"):
        parse_recipe({"base": "minilm", "data": "bbc-news"})


def test_overrides_parse_yaml_scalars_and_shorthands(tmp_path):
    path = write_recipe(tmp_path, GOOD)
    recipe = load_recipe(
        path,
        [
            "training.learning_rate=1e-3",
            "training.max_steps=2",
            "training.max_minutes=30",
            "training.loraplus_lr_ratio=16",
            "training.label_smoothing=0.1",
            "registry.tags=[a, b]",
            "adapter.peft.r=16",
            "base=/some/folder",
            "data.labels=null",
        ],
    )
    assert recipe.training.learning_rate == 1e-3 and recipe.training.max_steps == 2
    assert recipe.training.max_minutes == 30
    assert recipe.training.loraplus_lr_ratio == 16
    assert recipe.training.label_smoothing == 0.1
    assert recipe.registry.tags == ("a", "b")
    assert recipe.adapter.peft == {"r": 16}
    assert recipe.base.source == "/some/folder"
    swapped = load_recipe(path, ["adapter=probe"])
    assert swapped.adapter.preset == "probe" and swapped.adapter.peft == {}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.epoch=2", "training has no key 'epoch' (did you mean 'epochs'"),
        ("trainig.epochs=2", "the recipe has no key 'trainig' (did you mean 'training'"),
        ("training.epochs=fast", "(override 'training.epochs=fast'): training.epochs: must be"),
        ("training.epochs", "write key.path=value"),
        ("training.max_minutes=-1", "training.max_minutes must be > 0"),
        ("evaluation.batch_size=0", "evaluation.batch_size must be >= 1, got 0"),
        ("evaluation.max_rows=0", "evaluation.max_rows must be >= 1, got 0"),
        ("base.source.x=1", "single value"),
    ],
)
def test_bad_overrides(tmp_path, override, expected):
    with pytest.raises(ConfigError) as err:
        load_recipe(write_recipe(tmp_path, GOOD), [override])
    assert expected in str(err.value)


def test_unknown_recipe_and_preset_list_the_available(tmp_path):
    with pytest.raises(ConfigError, match="quickstart") as err:
        load_recipe("quickstrat")
    assert "did you mean 'quickstart'" in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    recipe = load_recipe(write_recipe(tmp_path, GOOD), ["adapter=lorra"])
    with pytest.raises(ConfigError, match="r.yaml, adapter: unknown adapter preset 'lorra'; built"):
        run_recipe(recipe, run_dir=tmp_path / "run", registry=tmp_path / "reg")
    recipe = load_recipe(write_recipe(tmp_path, GOOD), ["adapter.peft.init_lora_weights=corda"])
    with pytest.raises(
        ConfigError, match=r"r.yaml, adapter: .*lora.yaml: init_lora_weights='corda'"
    ):
        run_recipe(recipe, run_dir=tmp_path / "run2", registry=tmp_path / "reg")


def test_a_pissa_start_on_a_quantized_base_is_refused_before_loading(tmp_path):
    overrides = ["base.quantization=4bit", "adapter.peft.init_lora_weights=pissa"]
    recipe = load_recipe(write_recipe(tmp_path, GOOD), overrides)
    out = io.StringIO()
    with pytest.raises(ConfigError, match="r.yaml: task 'r'.*shared quantized base"):
        run_recipe(recipe, run_dir=tmp_path / "run", registry=tmp_path / "reg", out=out)
    assert "loading base" not in out.getvalue()


def test_override_does_not_touch_input():
    raw = {"base": "minilm", "data": {"source": "x"}}
    out = apply_overrides(raw, ["data.max_rows=3", "base.quantization=4bit"])
    assert raw == {"base": "minilm", "data": {"source": "x"}}
    assert out == {
        "base": {"source": "minilm", "quantization": "4bit"},
        "data": {"source": "x", "max_rows": 3},
    }


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, GOOD), ["training.max_steps=3"])
    again = parse_recipe(yaml.safe_load(yaml.safe_dump(recipe_to_dict(recipe))), source="x")
    assert recipe_to_dict(again) == recipe_to_dict(recipe)


# --- every built-in recipe ------------------------------------------------------------------------


def test_builtin_recipes_are_listed():
    names = available_recipes()
    assert "quickstart" in names and len(names) == len(RECIPES) >= 10


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_builtin_recipe_validates_and_says_how_to_run_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# peftkit ") and path.stem in first, first
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    if "../shared/data" in path.read_text():
        assert "data.source=" in path.read_text().split("\n\n")[0]


def tiny_overrides(path: Path, tmp_path: Path, tiny_models) -> list[str]:
    """Overrides that run ``path`` for 2 steps on a tiny model and tiny data."""
    recipe = load_recipe(path)
    out = [f"registry.path={tmp_path / 'registry'}"]
    if recipe.prompt is not None:
        from peftkit.prompting.templates import load_prompt_set

        labels = load_prompt_set(recipe.prompt.set).labels
        data = write_data(tmp_path / "data", labels, n_train=max(24, 8 * len(labels)))
        out += [f"base={tiny_models['llama']}", "evaluation.max_rows=4", "evaluation.batch_size=4"]
        if recipe.prompt.demonstrations:
            out.append("prompt.demonstrations=1")
    else:
        labels = ["negative", "positive"]
        init = recipe.adapter.head_init
        if init is not None and init.prompt:  # the labels its prompt set describes
            from peftkit.prompting.templates import load_prompt_set

            labels = list(load_prompt_set(init.prompt.split("/")[0]).labels)
        data = write_data(tmp_path / "data", labels, n_train=max(24, 8 * len(labels)))
        out += [f"base={tiny_models['bert']}", "training.max_steps=2", "training.batch_size=8"]
        for i, task in enumerate(recipe.then):
            # a task continuing the one before keeps its labels (and may add one)
            chained = task.adapter is not None and task.adapter.init_from
            then_labels = [*labels, "neutral"] if chained else ["ham", "spam", "other"]
            other = write_data(tmp_path / f"data{i}", then_labels)
            out += [f"then.{i}.data.source={other}", f"then.{i}.training.max_steps=2"]
    out.append(f"data.source={data}")
    return out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_builtin_recipe_runs_two_steps_on_a_tiny_model(
    path, tmp_path, tiny_models, reset_accelerate, capsys
):
    recipe = load_recipe(path, tiny_overrides(path, tmp_path, tiny_models))
    echo = io.StringIO()
    outcome = run_recipe(recipe, run_dir=tmp_path / "run", out=echo)
    assert capsys.readouterr().out == ""  # a library call prints nothing unless asked
    for name in (
        "recipe.yaml",
        "environment.json",
        "metrics.json",
        "report.txt",
        "report.json",
        "confusion.png",
        "run.log",
    ):
        assert (outcome.run_dir / name).is_file(), name
    metrics = json.loads((outcome.run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    out = echo.getvalue()
    assert "precision" in out and "macro avg" in out
    assert "macro avg" in (outcome.run_dir / "run.log").read_text()  # the report, logged
    if recipe.adapter is not None:
        assert metrics["steps"] == 2 and (outcome.run_dir / "curves.png").is_file()
        reg = Registry(tmp_path / "registry")
        assert reg.names() == sorted([recipe.registry_name, *(t.name for t in recipe.then)])
    if recipe.hotswap is not None:
        assert len(metrics["hotswap"]["batch"]) == len(recipe.hotswap.texts)
        assert "use()" in out
    if recipe.revisit:
        assert set(metrics["revisit"][recipe.then[-1].name]) == {
            recipe.registry_name,
            *(t.name for t in recipe.then),
        }


# --- run folders ----------------------------------------------------------------------------------


def _tiny(tmp_path: Path, tiny_models, extra=()) -> object:
    data = write_data(tmp_path / "data", ["negative", "positive"])
    text = GOOD.replace("base: minilm", f"base: {tiny_models['bert']}")
    path = write_recipe(tmp_path, text)
    return load_recipe(
        path,
        [
            f"data.source={data}",
            "training.max_steps=2",
            "training.batch_size=8",
            "training.checkpoint_every=1",
            *extra,
        ],
    )


def test_existing_run_folder_is_an_error_unless_overwrite(tmp_path, tiny_models, reset_accelerate):
    recipe = _tiny(tmp_path, tiny_models)
    first = run_recipe(recipe, run_dir=tmp_path / "run", registry=tmp_path / "reg")
    assert first.entries == ["r@1"]
    with pytest.raises(ConfigError, match="already exists and holds a finished run.*--overwrite"):
        run_recipe(recipe, run_dir=tmp_path / "run", registry=tmp_path / "reg")
    again = run_recipe(recipe, run_dir=tmp_path / "run", registry=tmp_path / "reg", overwrite=True)
    assert again.entries == ["r@2"] and not again.resumed


def test_run_folder_without_results_is_reused(tmp_path, tiny_models, reset_accelerate):
    """An empty folder, or one a run left when it failed before its first result, takes a
    new run; a run refused by its checks leaves no folder at all."""
    (tmp_path / "empty").mkdir()
    recipe = _tiny(tmp_path, tiny_models)
    assert run_recipe(recipe, run_dir=tmp_path / "empty", registry=tmp_path / "reg").entries
    bad = _tiny(tmp_path, tiny_models, ["adapter=lora-typo"])
    with pytest.raises(ConfigError, match="lora-typo"):
        run_recipe(bad, run_dir=tmp_path / "run", registry=tmp_path / "reg")
    assert not (tmp_path / "run").exists()
    # a failure after the checks (here: the model's weights are gone) keeps what it wrote
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_models["bert"], broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    failing = _tiny(tmp_path, tiny_models, [f"base={broken}"])
    with pytest.raises(Exception):  # noqa: B017  (transformers' own error for missing weights)
        run_recipe(failing, run_dir=tmp_path / "run", registry=tmp_path / "reg")
    assert {"environment.json", "recipe.yaml", "run.log"} <= {
        p.name for p in (tmp_path / "run").iterdir()
    }
    other = _tiny(tmp_path, tiny_models, ["training.max_steps=1"])
    done = run_recipe(other, run_dir=tmp_path / "run", registry=tmp_path / "reg")
    assert done.entries == ["r@2"] and not done.resumed
    assert "the run failed" in (tmp_path / "run" / "run.log").read_text()  # its log kept
    assert (
        yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["training"]["max_steps"] == 1
    )


def test_unfinished_run_of_same_recipe_resumes(
    tmp_path, tiny_models, reset_accelerate, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    recipe = _tiny(tmp_path, tiny_models)
    first = run_recipe(recipe, registry="reg")  # default folder: runs/r-<timestamp>
    assert first.run_dir.parent == Path("runs") and first.run_dir.name.startswith("r-")
    (first.run_dir / "metrics.json").unlink()  # as if stopped before the end
    again = run_recipe(recipe, registry="reg")
    assert again.resumed and again.run_dir == first.run_dir
    assert again.metrics["resumed_from"] == 2
    # The adapter was registered before the stop: the resumed run does not add a version.
    assert again.entries == first.entries == ["r@1"]
    assert [e.ref for e in Registry("reg").list()] == ["r@1"]
    other = _tiny(tmp_path, tiny_models, ["training.max_steps=3"])
    with pytest.raises(ConfigError, match="not an unfinished run of this same recipe"):
        (again.run_dir / "metrics.json").unlink()
        run_recipe(other, run_dir=again.run_dir, registry="reg")


# --- few-shot head start ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "full"])
def test_base_dtype_trains_fp32_adapters_that_serve_on_either_base(
    tmp_path, tiny_models, reset_accelerate, method
):
    from safetensors.torch import load_file

    from peftkit.models.base import load_base
    from peftkit.serving.adapted import AdaptedModel

    recipe = _tiny(tmp_path, tiny_models, ["base.dtype=bfloat16", f"adapter={method}"])
    assert recipe.base.dtype == "bfloat16"
    outcome = run_recipe(recipe, run_dir=tmp_path / "run", registry=tmp_path / "reg")
    assert "dtype bfloat16" in (outcome.run_dir / "run.log").read_text()
    registry = Registry(tmp_path / "reg")
    entry = registry.get(outcome.entries[0])
    assert entry.method == method
    files = [f for f in entry.path.glob("*.safetensors") if f.name != "head.safetensors"]
    weights = {k: v for f in files for k, v in load_file(f).items()}
    assert weights and {t.dtype for t in weights.values()} == {torch.float32}
    if method == "full":  # a whole model, exported rather than hot-swapped
        return
    texts = ["good film", "awful market"]
    probs = {}
    for dtype in ("float32", "bfloat16"):
        model = AdaptedModel(load_base(str(tiny_models["bert"]), dtype=dtype), registry)
        try:
            probs[dtype] = model.use(outcome.entries[0]).predict_proba(texts)
        finally:
            model.close()
    assert np.abs(probs["float32"] - probs["bfloat16"]).max() < 0.05
    with pytest.raises(
        ConfigError, match="base.dtype: 'half' is not one of null, float32, bfloat16"
    ):
        _tiny(tmp_path, tiny_models, ["base.dtype=half"])


def test_head_init_shorthand_and_bad_values(tmp_path):
    path = write_recipe(tmp_path, GOOD)
    recipe = load_recipe(path, ["adapter.head_init=prototypes"])
    assert recipe.adapter.head_init.method == "prototypes"
    assert recipe.adapter.head_init.prior == 2.0
    with pytest.raises(ConfigError, match="head_init.method"):
        load_recipe(path, ["adapter.head_init=centroids"])
    with pytest.raises(ConfigError, match="did you mean 'prior'"):
        load_recipe(path, ["adapter.head_init.priors=2"])


def test_head_init_prototypes_trains_and_registers_a_cosine_head(
    tmp_path, tiny_models, reset_accelerate
):
    recipe = _tiny(
        tmp_path,
        tiny_models,
        ["adapter.head_init.method=prototypes", "adapter.head_init.prompt=sentiment/it-was"],
    )
    outcome = run_recipe(recipe, run_dir=tmp_path / "run", registry=tmp_path / "reg")
    entry = Registry(tmp_path / "reg").get(outcome.entries[0])
    task = json.loads((entry.path / "task.json").read_text())
    assert task["head_normalize"] is True


def test_contrastive_objective_trains_the_body_and_registers_prototypes(
    tmp_path, tiny_models, reset_accelerate
):
    from peftkit.run.builders import load_task_data
    from peftkit.training.contrastive import contrastive_pairs

    extra = ["training.objective=contrastive", "training.max_steps=null", "training.epochs=1"]
    recipe = _tiny(tmp_path, tiny_models, ["adapter.head_init=prototypes", *extra])
    outcome = run_recipe(recipe, run_dir=tmp_path / "run", registry=tmp_path / "reg")
    entry = Registry(tmp_path / "reg").get(outcome.entries[0])
    assert entry.method == "lora"
    task = json.loads((entry.path / "task.json").read_text())
    assert task["head_normalize"] is True
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    _, train_split = load_task_data(recipe.data)
    pairs = contrastive_pairs(train_split.labels)
    assert metrics["steps"] == len(pairs) // 8  # one epoch over the pairs, batch 8
    with pytest.raises(ConfigError, match="objective: contrastive .* needs adapter.head_init"):
        run_recipe(_tiny(tmp_path, tiny_models, extra), run_dir=tmp_path / "bad")
    with pytest.raises(ConfigError, match="training.objective='pair'; use one of"):
        _tiny(tmp_path, tiny_models, ["training.objective=pair"])


def test_max_steps_0_registers_the_prototype_head_untrained(
    tmp_path, tiny_models, reset_accelerate
):
    from peftkit.models.base import load_base
    from peftkit.prompting.scorers import embed_texts
    from peftkit.run.builders import load_task_data
    from peftkit.serving.adapted import AdaptedModel
    from peftkit.training.prototypes import prototype_head

    def probe(extra):
        data = write_data(tmp_path / "data", ["negative", "positive"])
        text = GOOD.replace("base: minilm", f"base: {tiny_models['bert']}")
        text = text.replace("preset: lora\n  peft: {r: 4}", "preset: probe")
        return load_recipe(write_recipe(tmp_path, text), [f"data.source={data}", *extra])

    recipe = probe(["adapter.head_init=prototypes", "training.max_steps=0"])
    outcome = run_recipe(recipe, run_dir=tmp_path / "run", registry=tmp_path / "reg")
    registry = Registry(tmp_path / "reg")
    entry = registry.get(outcome.entries[0])
    assert entry.method == "probe"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 0 and not (tmp_path / "run" / "curves.png").exists()
    # what is served is the prototype head of the training rows, on the untouched base
    base = load_base(str(tiny_models["bert"]))
    data, train_split = load_task_data(recipe.data)
    head = prototype_head(base, train_split, data.labels)
    texts = list(data.split("test").texts)
    served = AdaptedModel(base, registry).predict_proba(texts, adapter=entry.ref)
    x = torch.as_tensor(embed_texts(base.model, base.tokenizer, texts, max_length=128))
    want = torch.softmax(head(x), -1).detach().numpy()
    np.testing.assert_allclose(served, want, atol=1e-5)
    assert metrics["accuracy"] == pytest.approx(
        float((want.argmax(1) == np.array(data.split("test").labels)).mean())
    )
    # no training needs a start head to register, on a probe
    bad = [
        _tiny(tmp_path, tiny_models, ["adapter.head_init=prototypes", "training.max_steps=0"]),
        probe(["training.max_steps=0"]),
    ]
    for i, recipe in enumerate(bad):
        with pytest.raises(ConfigError, match="max_steps: 0 registers the prototype head"):
            run_recipe(recipe, run_dir=tmp_path / f"bad{i}", registry=tmp_path / "reg")
    with pytest.raises(ConfigError, match="max_steps must be >= 0"):
        run_recipe(probe(["training.max_steps=-1"]), run_dir=tmp_path / "bad9")


def test_head_init_needs_mean_pooling_and_one_description_source(
    tmp_path, tiny_models, reset_accelerate
):
    base = f"base={tiny_models['llama']}"
    recipe = _tiny(tmp_path, tiny_models, [base, "adapter.head_init=prototypes"])
    with pytest.raises(ConfigError, match="pools 'last'.*adapter.pooling=mean"):
        run_recipe(recipe, run_dir=tmp_path / "run", registry=tmp_path / "reg")
    both = [
        "adapter.head_init.prompt=sentiment",
        "adapter.head_init.descriptions={negative: bad, positive: good}",
    ]
    recipe = _tiny(tmp_path, tiny_models, both)
    with pytest.raises(ConfigError, match="prompt or descriptions, not both"):
        run_recipe(recipe, run_dir=tmp_path / "run2", registry=tmp_path / "reg")
