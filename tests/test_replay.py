"""``training.replay``: a seeded share of earlier rows mixed into the training split, labels
matched by name; data fingerprints; and replay in a recipe, recorded in the lineage."""

from __future__ import annotations

import io

import pytest
from test_recipes import GOOD, write_data, write_recipe

from peftkit.config.recipes import load_recipe, parse_recipe
from peftkit.config.training import ReplaySpec, TrainConfig
from peftkit.data.dataset import Split, TextDataset
from peftkit.data.fingerprint import data_fingerprints, split_fingerprint
from peftkit.data.replay import mix_replay, replay_rows, with_label_order
from peftkit.errors import ConfigError
from peftkit.registry.store import Registry
from peftkit.run.pipeline import run_recipe

NEW = ("negative", "positive", "neutral")


def rows(prefix: str, n: int, labels: int) -> Split:
    return Split(tuple(f"{prefix} {i}" for i in range(n)), tuple(i % labels for i in range(n)))


@pytest.mark.parametrize(("n", "share"), [(80, 0.2), (30, 0.5), (7, 0.1), (100, 0.75)])
def test_the_replayed_share_of_the_final_rows_is_the_one_asked(n, share):
    train = rows("new", n, 3)
    old = rows("old", 500, 2)
    mixed = mix_replay(train, NEW, [("old", old, ("positive", "negative"))], share=share, seed=0)
    replayed = len(mixed) - n
    assert replayed == replay_rows(n, share) == round(share * n / (1 - share))
    assert abs(replayed / len(mixed) - share) <= 0.5 / len(mixed) + 1e-9
    assert mixed.texts[:n] == train.texts and mixed.labels[:n] == train.labels
    # labels by name: old id 0 ('positive') is the new id 1; old 1 ('negative') is 0
    for text, y in zip(mixed.texts[n:], mixed.labels[n:], strict=True):
        assert text.startswith("old ") and y == (1 if int(text.split()[1]) % 2 == 0 else 0)


def test_replay_is_seeded_and_split_evenly_over_its_sources():
    train = rows("new", 80, 3)
    pools = [("a", rows("a", 300, 2), NEW[:2]), ("b", rows("b", 300, 2), NEW[:2])]
    one, again = (mix_replay(train, NEW, pools, share=0.2, seed=1) for _ in range(2))
    other = mix_replay(train, NEW, pools, share=0.2, seed=2)
    assert one == again and one != other
    replayed = one.texts[80:]
    assert sum(t.startswith("a ") for t in replayed) == sum(t.startswith("b ") for t in replayed)
    assert len(set(replayed)) == len(replayed)  # no row twice while the source has enough


def test_a_small_source_is_repeated_to_reach_the_share():
    mixed = mix_replay(rows("new", 40, 2), NEW, [("s", rows("s", 3, 2), NEW[:2])], share=0.5,
                       seed=0)  # fmt: skip
    assert len(mixed) == 80 and set(mixed.texts[40:]) == {"s 0", "s 1", "s 2"}


def test_replay_source_labels_must_be_among_the_new_ones():
    with pytest.raises(ConfigError, match=r"replay source 'tweets': labels \['neutral'\] are not"):
        mix_replay(rows("n", 10, 2), NEW[:2], [("tweets", rows("t", 9, 3), NEW)], share=0.2, seed=0)


@pytest.mark.parametrize("share", [0, 1, 1.5, -0.1])
def test_a_share_outside_0_1_is_refused(share):
    with pytest.raises(ConfigError, match=r"replay.share .* in \(0, 1\)"):
        TrainConfig(replay=ReplaySpec(source="previous", share=share))
    raw = {"base": "minilm", "data": "x", "adapter": "lora"}
    with pytest.raises(ConfigError, match=r"training.replay.share"):
        parse_recipe({**raw, "training": {"replay": {"source": "previous", "share": share}}})


def test_label_order_renumbers_every_split_and_keeps_the_fingerprints():
    data = TextDataset("d", ("neutral", "negative", "positive"), {"train": rows("x", 9, 3)})
    ordered = with_label_order(data, NEW)
    assert ordered.labels == NEW
    names = [data.labels[y] for y in data.split("train").labels]
    assert [ordered.labels[y] for y in ordered.split("train").labels] == names
    assert data_fingerprints(data) == data_fingerprints(ordered)  # the same rows, by name
    changed = Split(("x 0 changed", *data.split("train").texts[1:]), data.split("train").labels)
    assert split_fingerprint(changed, data.labels) != data_fingerprints(data)["train"]


THEN = """
then:
  - name: second
    adapter: {preset: lora, peft: {r: 4}, init_from: previous}
    data: {source: SECOND}
    training: {replay: {source: previous, share: 0.25}}
"""


def test_a_recipe_continues_the_task_before_with_replay(tmp_path, tiny_models, reset_accelerate):
    first = write_data(tmp_path / "d1", ["negative", "positive"], n_train=40)
    second = write_data(tmp_path / "d2", ["positive", "negative", "neutral"], n_train=30, seed=1)
    text = GOOD.replace("base: minilm", f"base: {tiny_models['bert']}") + THEN
    path = write_recipe(tmp_path, text.replace("SECOND", str(second)))
    overrides = [f"data.source={first}", "training.max_steps=2", "training.batch_size=8"]
    echo = io.StringIO()
    outcome = run_recipe(load_recipe(path, overrides), run_dir=tmp_path / "run",
                         registry=tmp_path / "reg", out=echo)  # fmt: skip
    first_ref, second_ref = outcome.entries
    assert "continues r@1 (adapter.init_from)" in echo.getvalue()
    assert "replays 10 rows of previous (25% of the training rows)" in echo.getvalue()
    with Registry(tmp_path / "reg") as reg:
        entry = reg.get(second_ref)
    assert entry.labels == ("negative", "positive", "neutral")
    assert entry.lineage["parent"] == first_ref
    assert entry.lineage["replay"]["rows"] == 10 and entry.lineage["replay"]["share"] == 0.25
    assert len(entry.lineage["replay"]["fingerprint"]) == 24


def test_replay_of_labels_the_new_data_lacks_is_refused_before_loading(tmp_path, tiny_models):
    first = write_data(tmp_path / "d1", ["negative", "positive", "neutral"])
    second = write_data(tmp_path / "d2", ["negative", "positive"], seed=1)
    text = GOOD + THEN.replace("init_from: previous", "init_from: null")
    path = write_recipe(tmp_path, text.replace("SECOND", str(second)))
    with pytest.raises(ConfigError, match=r"training.replay: replay source 'r': labels \['neutral"):
        run_recipe(load_recipe(path, [f"data.source={first}"]), run_dir=tmp_path / "run",
                   registry=tmp_path / "reg")  # fmt: skip
    assert not (tmp_path / "run").exists()
