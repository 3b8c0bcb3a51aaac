"""Promotion behind a gate: ``peftkit adapters promote NAME@V --alias A --gate ...`` scores the
candidate and the alias's version on the same test rows, moves the alias only when every gate
holds, and records the decision (figures, who, when) either way; two promotions racing for
one alias: one wins, the other is refused; bad input is one line before any model loads."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from peftkit.adapters.folder import release, save_adapter
from peftkit.adapters.model import build_task_model
from peftkit.cli import main
from peftkit.config.gates import parse_gate, parse_gates
from peftkit.config.presets import load_preset
from peftkit.errors import ConfigError, DataError, RegistryError
from peftkit.models.base import load_base
from peftkit.registry.store import Registry
from peftkit.run.promote import decision_text, plan_promotion, promote

LABELS = ["negative", "positive"]
NEGATIVE, POSITIVE = [8.0, -8.0], [-8.0, 8.0]  # head biases: always that label


def write_rows(folder: Path, split: str, labels: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"text": f"the film was {'good' if i % 2 else 'bad'}", "label": lab}
            for i, lab in enumerate(labels)]  # fmt: skip
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def made(tiny_models, tmp_path_factory):
    """Probe adapters on the tiny bert that always answer one label, and test data where
    'negative' is right on 30 rows of 40: accuracy 0.75 always-negative, 0.25 always-positive."""
    root = tmp_path_factory.mktemp("promote")
    base = load_base(tiny_models["bert"])
    folders = {}
    for name, bias in (("neg", NEGATIVE), ("pos", POSITIVE)):
        model = build_task_model(base, load_preset("probe"), labels=LABELS, max_length=16)
        with torch.no_grad():
            model.head.linear.weight.zero_()
            model.head.linear.bias.copy_(torch.tensor(bias))
        folders[name] = save_adapter(model, root / name)
        release(model)
    other = build_task_model(base, load_preset("probe"), labels=["ham", "spam"], max_length=16)
    folders["ham"] = save_adapter(other, root / "ham")
    release(other)
    data = root / "data"
    write_rows(data, "train", ["negative", "positive"] * 4)
    write_rows(data, "test", ["negative"] * 30 + ["positive"] * 10)
    return {"base": base, "folders": folders, "data": data, "root": root}


@pytest.fixture()
def reg(made, tmp_path) -> Registry:
    """sst2@1 always negative (0.75), sst2@2 always positive (0.25), sst2@3 negative again;
    sst2@production -> sst2@1."""
    registry = Registry(tmp_path / "registry")
    for key in ("neg", "pos", "neg"):
        registry.register("sst2", made["folders"][key])
    registry.alias("sst2@1", "production")
    return registry


def cli(reg, capsys, *argv):
    code = main(["adapters", "--registry", str(reg.root), *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# -- the gate grammar --------------------------------------------------------------------------


def test_gates_parse_relative_absolute_and_joined():
    gate = parse_gate("accuracy on data/sst2 >= alias - 0.5")
    assert (gate.metric, gate.data, gate.relative, gate.strict) == (
        "accuracy",
        "data/sst2",
        True,
        False,
    )
    assert gate.bound(0.9) == pytest.approx(0.895)  # half a percentage point
    assert gate.holds(0.895, 0.9) and not gate.holds(0.8949, 0.9) and gate.holds(0.1, None)
    assert parse_gate("macro_f1 on x > alias").holds(0.9, 0.9) is False
    assert parse_gate("accuracy on x >= 85%").bound(None) == pytest.approx(0.85)
    both = parse_gates(
        ["accuracy on a >= 0.8 and macro_f1 on b >= alias + 1", "accuracy on c > .5"]
    )
    assert [(g.metric, g.data, g.offset) for g in both] == [
        ("accuracy", "a", 0.8),
        ("macro_f1", "b", pytest.approx(0.01)),
        ("accuracy", "c", 0.5),
    ]


@pytest.mark.parametrize(
    ("gate", "expected"),
    [
        ("accuracy >= 0.8", "cannot read gate .*METRIC on DATA"),
        ("acuracy on d >= alias", "unknown metric 'acuracy'.*did you mean 'accuracy'"),
        ("f1 on d >= alias", "unknown metric 'f1'.*one of accuracy, macro_f1"),
        ("accuracy on d >= production - 1", "cannot read the bound 'production - 1'"),
        ("accuracy on d >= 1.5", "not a score"),
        ("accuracy on d <= 0.5", "cannot read gate"),
    ],
)
def test_bad_gates_say_the_grammar(gate, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_gates(gate)


# -- a promotion that passes, one that is refused ----------------------------------------------


def test_a_promotion_that_passes_moves_the_alias_and_records_it(reg, made, capsys, monkeypatch):
    monkeypatch.setenv("PEFTKIT_USER", "ana")
    data = made["data"]
    code, out, err = cli(
        reg, capsys, "promote", "sst2@3", "--alias", "production",
        "--gate", f"accuracy on {data} >= alias - 0.5", "--gate", f"macro_f1 on {data} >= 0.3",
    )  # fmt: skip
    assert code == 0, err
    assert reg.get("sst2@production").ref == "sst2@3"
    assert "PASSED: sst2@production sst2@1 -> sst2@3" in out
    assert "candidate sst2@3" in out and "current sst2@1" in out
    ci = reg.promotions("sst2")[0].figures["data"][str(data)]["candidate"]
    low, high = ci["accuracy"]["low"], ci["accuracy"]["high"]
    assert 0.5 < low < 0.75 < high < 1.0, ci
    assert f"0.7500 [{low:.4f}, {high:.4f}]" in out
    assert "95% intervals: bootstrap over 40 test rows" in out
    (record,) = reg.promotions("sst2")
    assert (record.candidate, record.previous, record.decision, record.who) == (
        "sst2@3", "sst2@1", "passed", "ana"
    )  # fmt: skip
    figures = record.figures["data"][str(data)]
    assert figures["rows"] == 40 and figures["candidate"]["accuracy"]["estimate"] == 0.75
    assert figures["paired"]["difference"]["accuracy"]["estimate"] == 0.0  # same answers
    assert [g["holds"] for g in record.figures["gates"]] == [True, True]
    # adapters show lists it
    code, out, _ = cli(reg, capsys, "show", "sst2@3")
    shown = json.loads(out)
    assert shown["aliases"] == ["production"]
    assert shown["promotions"][0]["decision"] == "passed" and shown["promotions"][0]["who"] == "ana"


def test_a_refused_promotion_leaves_the_alias_and_records_the_figures(reg, made, capsys):
    gate = f"accuracy on {made['data']} >= alias - 0.5"
    code, out, err = cli(reg, capsys, "promote", "sst2@2", "--alias", "production", "--gate", gate)
    assert code == 1 and "error" not in err and "Traceback" not in out + err  # a refusal
    assert reg.get("sst2@production").ref == "sst2@1"
    assert "FAILS: accuracy on" in out and "0.2500 < 0.7500 - 0.0050 = 0.7450" in out
    assert "REFUSED: 1 of 1 gate(s) fail; sst2@production stays at sst2@1" in out
    assert "difference (paired)" in out and "the current version is better" in out
    (record,) = reg.promotions("sst2")
    assert record.decision == "refused" and record.previous == "sst2@1"
    gates = record.figures["gates"]
    assert gates[0]["candidate"] == 0.25 and gates[0]["current"] == 0.75
    assert gates[0]["holds"] is False and gates[0]["bound"] == pytest.approx(0.745)
    paired = record.figures["data"][str(made["data"])]["paired"]
    assert paired["difference"]["accuracy"]["estimate"] == pytest.approx(-0.5)
    assert paired["verdict"]["accuracy"] == "A is better"  # A: the current version


def test_with_no_alias_yet_a_relative_gate_holds_and_an_absolute_one_decides(reg, made):
    data = made["data"]
    plan = plan_promotion(reg, "sst2@2", "canary", [f"accuracy on {data} >= alias"])
    assert plan.current is None
    first = promote(plan, made["base"])
    assert first.passed and "pointed nowhere" in first.reason
    assert reg.get("sst2@canary").ref == "sst2@2" and first.previous is None
    assert "now nothing" in decision_text(first)
    plan = plan_promotion(reg, "sst2@2", "staging", f"accuracy on {data} >= 0.5")
    refused = promote(plan, made["base"])
    assert not refused.passed and "0.2500 < 0.5000" in refused.reason
    assert "sst2@staging" not in reg.aliases()


def test_two_promotions_racing_for_one_alias_one_wins(reg, made, tiny_models):
    """Both are planned while the alias points at sst2@1; each scores on its own base in
    its own thread with its own registry connection; the alias moves once."""
    gate = f"accuracy on {made['data']} >= 0"
    plans = [
        plan_promotion(Registry(reg.root), ref, "production", gate) for ref in ("sst2@2", "sst2@3")
    ]
    bases = [made["base"], load_base(tiny_models["bert"])]
    results: list = [None, None]
    start = threading.Barrier(2)

    def go(i):
        start.wait()
        results[i] = promote(plans[i], bases[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.decision for r in results) == ["passed", "refused"]
    winner = next(r for r in results if r.passed)
    loser = next(r for r in results if not r.passed)
    assert reg.get("sst2@production").ref == winner.candidate
    assert f"was moved from sst2@1 to {winner.candidate}" in loser.reason
    recorded = reg.promotions("sst2")
    assert sorted((p.candidate, p.decision) for p in recorded) == sorted(
        (r.candidate, r.decision) for r in results
    )


# -- bad input: one line, before any model is loaded ------------------------------------------


@pytest.fixture()
def no_model(monkeypatch):
    """Loading a base fails the test: bad input must be refused before."""
    import peftkit.models.base as base_module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(base_module, "load_base", refuse)


def test_bad_promotions_are_refused_before_loading(reg, made, tmp_path, no_model):
    data = made["data"]
    good = f"accuracy on {data} >= alias"
    cases = [
        (("sst2@9", "production", good), "no version 9"),
        (("nope@1", "production", good), "no adapter named 'nope'"),
        (("sst2@production", "production", good), "give the candidate as NAME@VERSION"),
        (("sst2@2", "latest", good), "invalid alias 'latest'"),
        (("sst2@1", "production", good), "already points at sst2@1"),
        (("sst2@2", "production", f"accurcy on {data} >= alias"), "did you mean 'accuracy'"),
        (("sst2@2", "production", f"accuracy on {tmp_path}/missing >= 0.5"), "does not exist"),
    ]
    for args, expected in cases:
        with pytest.raises((ConfigError, DataError, RegistryError), match=expected):
            plan_promotion(reg, *args)
    assert reg.promotions("sst2") == [] and reg.get("sst2@production").ref == "sst2@1"


def test_data_without_a_test_split_or_with_other_labels_is_refused(reg, made, tmp_path, no_model):
    only_train = tmp_path / "only-train"
    write_rows(only_train, "train", ["negative", "positive"])
    with pytest.raises(DataError, match="has no test split"):
        plan_promotion(reg, "sst2@2", "production", f"accuracy on {only_train} >= 0.5")
    other = tmp_path / "other"
    write_rows(other, "test", ["ham", "spam", "negative"])
    with pytest.raises(DataError, match=r"do not match sst2@2's: it does not know 'ham', 'spam'"):
        plan_promotion(reg, "sst2@2", "production", f"accuracy on {other} >= 0.5")


def test_a_candidate_of_another_base_is_refused(reg, made, tmp_path, no_model):
    folder = made["folders"]["neg"]
    task = json.loads((folder / "task.json").read_text())
    copy = tmp_path / "other-base"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "task.json").write_text(json.dumps({**task, "base_fingerprint": "fp-other"}))
    reg.register("sst2", copy)  # sst2@4, on another base
    with pytest.raises(ConfigError, match="trained on base 'fp-other'.*sst2@1.*one base"):
        plan_promotion(reg, "sst2@4", "production", f"accuracy on {made['data']} >= 0.5")


# -- a recipe that ends with the gate ---------------------------------------------------------


def _recipe_run(tmp_path, tiny_models, name, data, gate):
    from test_recipes import GOOD, write_recipe

    from peftkit.config.recipes import load_recipe
    from peftkit.run.pipeline import run_recipe

    text = GOOD.replace("base: minilm", f"base: {tiny_models['bert']}")
    text += f"promote:\n  alias: production\n  gate: [{json.dumps(gate)}]\n"
    recipe = load_recipe(
        write_recipe(tmp_path, text, f"{name}.yaml"),
        [
            f"data.source={data}",
            "training.max_steps=2",
            "training.batch_size=8",
            "registry.name=clf",
        ],
    )
    return run_recipe(recipe, run_dir=tmp_path / name, registry=tmp_path / "reg")


def test_a_recipe_promote_block_decides_after_registering(tmp_path, tiny_models, reset_accelerate):
    from test_recipes import write_data

    data = write_data(tmp_path / "data", LABELS, n_eval=16)
    first = _recipe_run(tmp_path, tiny_models, "one", data, f"accuracy on {data} >= alias - 1")
    assert first.metrics["promotion"]["decision"] == "passed"  # no alias yet: relative holds
    reg = Registry(tmp_path / "reg")
    assert reg.get("clf@production").ref == "clf@1"
    # the second must beat the first by 100 points: refused, the alias stays
    second = _recipe_run(tmp_path, tiny_models, "two", data, f"accuracy on {data} > alias + 100")
    saved = json.loads((second.run_dir / "metrics.json").read_text())["promotion"]
    assert saved["decision"] == "refused" and saved["candidate"] == "clf@2"
    assert saved["previous"] == "clf@1" and saved["figures"]["data"][str(data)]["rows"] == 16
    assert reg.get("clf@production").ref == "clf@1"
    assert [p.decision for p in reg.promotions("clf")] == ["refused", "passed"]


def test_a_recipe_gate_on_missing_data_is_refused_before_training(tmp_path, tiny_models):
    from test_recipes import write_data

    data = write_data(tmp_path / "data", LABELS)
    with pytest.raises(DataError, match="promote.gate .*does not exist"):
        _recipe_run(tmp_path, tiny_models, "bad", data, f"accuracy on {tmp_path}/nope >= 0.5")
    assert not (tmp_path / "bad").exists()
