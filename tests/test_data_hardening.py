"""load_data on data it has never seen: pairs found in the rows, max_rows as a stratified
sample, silent wrong results refused, test-only data for scoring (issue 23)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from peftkit.data.load import Split, TextDataset, few_shot, load_data
from peftkit.errors import ConfigError, DataError


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pair_rows(n: int, labels=("entailment", "neutral", "contradiction")) -> list[dict]:
    return [
        {"text": f"premise {i}", "text_pair": f"hypothesis {i}", "label": labels[i % len(labels)]}
        for i in range(n)
    ]


def sorted_rows(counts: dict[str, int]) -> list[dict]:
    """Rows grouped by label, as many public sets are sorted; text ``row N`` is row N."""
    labels = [lab for lab, c in counts.items() for _ in range(c)]
    return [{"text": f"row {i}", "label": lab} for i, lab in enumerate(labels)]


def row_number(text: str) -> int:
    return int(text.split()[1])


# ---------------------------------------------------------------------------- pairs


def test_rows_with_text_pair_are_read_as_pairs_in_every_split(tmp_path: Path, caplog):
    d = tmp_path / "nli"
    for split, n in (("train", 12), ("validation", 6), ("test", 6)):
        write_jsonl(d / f"{split}.jsonl", pair_rows(n))
    with caplog.at_level(logging.INFO, logger="peftkit.data"):
        data = load_data(d)
    assert "rows carry 'text_pair': training on text pairs" in caplog.text
    assert data.pairs
    for split in data.splits.values():
        assert split.text_pairs is not None and len(split.text_pairs) == len(split)
        assert all(
            p == t.replace("premise", "hypothesis")
            for t, p in zip(split.texts, split.text_pairs, strict=True)
        )
    off = load_data(d, text_pair_field="")
    assert not off.pairs
    assert all(s.text_pairs is None for s in off.splits.values())


def test_pairs_of_a_single_file_follow_its_carved_splits(tmp_path: Path):
    f = write_jsonl(tmp_path / "nli.jsonl", pair_rows(60))
    data = load_data(f)
    assert data.pairs and set(data.splits) == {"train", "validation", "test"}
    for split in data.splits.values():
        assert [row_number(t) for t in split.texts] == [row_number(p) for p in split.text_pairs]
    c = tmp_path / "nli.csv"
    c.write_text("text,text_pair,label\na,b,x\nc,d,y\ne,f,x\ng,h,y\n", encoding="utf-8")
    assert load_data(c, split_ratios=(1.0, 0.0, 0.0)).pairs


def test_rows_without_pairs_and_rows_with_some(tmp_path: Path, caplog):
    d = tmp_path / "t"
    write_jsonl(d / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(8)])
    assert not load_data(d).pairs
    some = pair_rows(8, labels=("a", "b"))
    del some[3]["text_pair"]
    write_jsonl(d / "train.jsonl", some)
    with caplog.at_level(logging.WARNING, logger="peftkit.data"):
        data = load_data(d)
    assert not data.pairs
    assert "7 of 8 rows carry 'text_pair' (line 4 has none): not using pairs" in caplog.text
    with pytest.raises(DataError, match=r"train\.jsonl, line 4: no field 'text_pair'"):
        load_data(d, text_pair_field="text_pair")


def test_pairs_in_train_but_not_in_test_are_refused(tmp_path: Path):
    d = tmp_path / "t"
    write_jsonl(d / "train.jsonl", pair_rows(9))
    test = pair_rows(3)
    del test[1]["text_pair"]
    write_jsonl(d / "test.jsonl", test)
    with pytest.raises(
        DataError, match=r"test\.jsonl, line 2: no field 'text_pair', though every row of .*train"
    ):
        load_data(d)
    assert not load_data(d, text_pair_field="").pairs


def test_a_pair_that_is_not_text_says_how_to_leave_pairs_out(tmp_path: Path):
    rows = pair_rows(4, labels=("a", "b"))
    rows[2]["text_pair"] = 7
    f = write_jsonl(tmp_path / "f.jsonl", rows)
    with pytest.raises(DataError, match=r"line 3: field 'text_pair' is int 7.*text_pair_field=''"):
        load_data(f)


def test_a_dataset_mixing_paired_and_unpaired_splits_is_refused():
    paired = Split(("a", "b"), (0, 1), ("x", "y"))
    plain = Split(("c",), (0,))
    with pytest.raises(DataError, match=r"splits \['train'\] have text pairs and \['test'\]"):
        TextDataset("x", ("p", "q"), {"train": paired, "test": plain})
    assert TextDataset("x", ("p", "q"), {"train": paired, "test": Split((), ())}).pairs


# ---------------------------------------------------------------------------- max_rows


def test_max_rows_keeps_every_label_of_a_file_sorted_by_label(tmp_path: Path, caplog):
    counts = {f"label{i:02d}": 10 for i in range(30)}
    d = tmp_path / "sorted"
    write_jsonl(d / "train.jsonl", sorted_rows(counts))
    write_jsonl(d / "validation.jsonl", sorted_rows(counts))
    first = load_data(d, max_rows=60, sample="first")
    assert len(set(first.split("train").labels)) == 6  # what max_rows used to keep
    with caplog.at_level(logging.INFO, logger="peftkit.data"):
        data = load_data(d, max_rows=60, seed=3)
    assert "kept 60 of 300 train rows, 30 of the 30 labels present" in caplog.text
    train = data.split("train")
    assert len(train) == 60 and Counter(train.labels) == {y: 2 for y in range(30)}
    numbers = [row_number(t) for t in train.texts]
    assert numbers == sorted(numbers)  # in the file's order
    assert all(  # each row keeps its own label
        data.labels[y] == f"label{n // 10:02d}" for n, y in zip(numbers, train.labels, strict=True)
    )
    again = load_data(d, max_rows=60, seed=3).split("train")
    assert again == train
    assert load_data(d, max_rows=60, seed=4).split("train").texts != train.texts


def test_max_rows_is_proportional_and_keeps_rare_labels(tmp_path: Path):
    f = tmp_path / "skewed"
    write_jsonl(f / "train.jsonl", sorted_rows({"big": 160, "mid": 38, "rare": 2}))
    train = load_data(f, max_rows=20, seed=0).split("train")
    counts = Counter(train.labels)
    assert sum(counts.values()) == 20 and set(counts) == {0, 1, 2}
    # one each first, then the 17 left in proportion to the rows left, 159 : 37 : 1
    # (13.7, 3.2, 0.09: floors 13, 3, 0, and one more for the largest remainder)
    assert counts == {0: 1 + 14, 1: 1 + 3, 2: 1 + 0}


def test_max_rows_below_the_label_count_keeps_the_commonest(tmp_path: Path, caplog):
    f = tmp_path / "many"
    write_jsonl(f / "train.jsonl", sorted_rows({"a": 5, "b": 30, "c": 3, "d": 20, "e": 2}))
    with caplog.at_level(logging.INFO, logger="peftkit.data"):
        train = load_data(f, max_rows=2, seed=1).split("train")
    assert len(train) == 2
    assert set(train.labels) == {1, 3}  # b and d: proportional, the rest round to nothing
    assert "2 of the 5 labels present (left out: a, c, e)" in caplog.text


def test_max_rows_and_split_ratio_options_are_checked(tmp_path: Path):
    f = write_jsonl(tmp_path / "f.jsonl", sorted_rows({"a": 5, "b": 5}))
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ConfigError, match=r"max_rows \(data\.max_rows in a recipe\)"):
            load_data(f, max_rows=bad)
    with pytest.raises(ConfigError, match=r"data\.sample.*stratified, first.*'rand'"):
        load_data(f, max_rows=3, sample="rand")
    with pytest.raises(ConfigError, match=r"needs three numbers.*\(2 given\)"):
        load_data(f, split_ratios=(0.9, 0.1))
    with pytest.raises(ConfigError, match=r"they sum to 1\.2"):
        load_data(f, split_ratios=(0.8, 0.2, 0.2))
    for bad in ((float("nan"), 0.5, 0.5), "0.8", 0.8, (0.5, "0.25", 0.25)):
        with pytest.raises(ConfigError, match="split_ratios"):
            load_data(f, split_ratios=bad)


# ---------------------------------------------------------------------------- wrong results


def test_labels_mixing_ids_and_names_are_refused(tmp_path: Path):
    d = tmp_path / "mix"
    labels = [0, 1, "neg", "pos", 0, "pos"]
    write_jsonl(d / "train.jsonl", [{"text": f"t{i}", "label": y} for i, y in enumerate(labels)])
    with pytest.raises(
        DataError,
        match=r"labels mix ids and names: .*train\.jsonl, line 1 has 0 \(an id\) and "
        r".*train\.jsonl, line 3 has 'neg' \(a name\).*labels\.json",
    ):
        load_data(d)
    (d / "labels.json").write_text('["neg", "pos"]')  # the ids index the list: accepted
    data = load_data(d, split_ratios=(1.0, 0.0, 0.0))
    assert sorted(data.split("train").labels) == [0, 0, 0, 1, 1, 1]


def test_ids_in_one_file_and_names_in_another_are_refused(tmp_path: Path):
    d = tmp_path / "mix"
    write_jsonl(d / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(6)])
    write_jsonl(d / "test.jsonl", [{"text": "u", "label": "a"}, {"text": "v", "label": 1}])
    with pytest.raises(DataError, match=r"test\.jsonl, line 2 has 1 \(an id\) and .*train\.jsonl"):
        load_data(d)


def test_labels_json_naming_absent_labels_warns_or_refuses(tmp_path: Path, caplog):
    d = tmp_path / "t"
    write_jsonl(d / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(8)])
    (d / "labels.json").write_text('["a", "b", "c"]')
    with caplog.at_level(logging.WARNING, logger="peftkit.data"):
        data = load_data(d)
    assert data.labels == ("a", "b", "c")  # the declared set: a 3-way head
    assert "labels.json names 1 of its 3 labels that no split has: c" in caplog.text
    (d / "labels.json").write_text('["a", "b", "c", "d", "e"]')
    with pytest.raises(DataError, match=r"labels\.json names 3 of its 5 labels that no split"):
        load_data(d)
    with pytest.raises(DataError, match="labels argument names 3 of its 5"):
        load_data(d, labels=["x", "a", "y", "b", "z"])


def test_data_with_a_single_label_is_refused(tmp_path: Path):
    d = tmp_path / "t"
    write_jsonl(d / "train.jsonl", [{"text": f"t{i}", "label": "pos"} for i in range(8)])
    with pytest.raises(DataError, match=r"every row has the same label, 'pos' .*train\.jsonl"):
        load_data(d)
    (d / "labels.json").write_text('["neg", "pos"]')
    with pytest.raises(DataError, match="every row has the same label"):
        load_data(d)
    scoring = load_data(d, need_train=False)  # scoring alone may
    assert sum(len(s) for s in scoring.splits.values()) == 8


def test_empty_texts_are_refused_with_file_line_and_count(tmp_path: Path):
    rows = [{"text": t, "label": "ab"[i % 2]} for i, t in enumerate(["a", "", "b", "  \n", "c"])]
    f = write_jsonl(tmp_path / "f.jsonl", rows)
    with pytest.raises(
        DataError, match=r"f\.jsonl, line 2: field 'text' is empty \(2 of 5 rows: lines 2, 4\)"
    ):
        load_data(f)
    c = tmp_path / "c.csv"
    c.write_text("text,text_pair,label\na,b,x\nc, ,y\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.csv, line 3: field 'text_pair' is empty"):
        load_data(c)


def test_a_missing_field_names_the_closest_one_whatever_its_case(tmp_path: Path):
    f = write_jsonl(tmp_path / "f.jsonl", [{"Text": "a", "Label": "x"}])
    with pytest.raises(DataError, match=r"no field 'text'; fields present: 'Text', 'Label' \("):
        load_data(f)
    with pytest.raises(DataError, match=r"no field 'label'.*did you mean 'Label'\?.*label_field="):
        load_data(f, text_field="Text")


def test_files_that_are_not_utf8_name_the_line_and_byte(tmp_path: Path):
    f = tmp_path / "u16.jsonl"
    f.write_bytes('{"text": "a", "label": "x"}\n'.encode("utf-16"))
    with pytest.raises(DataError, match=r"u16\.jsonl, line 1 \(byte 0\): not UTF-8 text"):
        load_data(f)
    t = tmp_path / "latin.tsv"
    t.write_bytes("text\tlabel\nok\tx\nfine\tx\ncaf\xe9\ty\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.tsv, line 4 \(byte 26\): not UTF-8.*0xe9"):
        load_data(t)
    d = tmp_path / "d"
    write_jsonl(d / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    (d / "labels.json").write_bytes(b'["x", "y\xff"]')
    with pytest.raises(DataError, match=r"labels\.json, line 1 \(byte 8\): not UTF-8"):
        load_data(d)
    bom = tmp_path / "bom.csv"
    bom.write_bytes("text,label\na,x\nb,y\n".encode("utf-8-sig"))  # a BOM is UTF-8
    assert load_data(bom, split_ratios=(1.0, 0.0, 0.0)).labels == ("x", "y")


# ---------------------------------------------------------------------------- scoring alone


def test_a_test_only_folder_loads_for_scoring(tmp_path: Path):
    d = tmp_path / "only_test"
    write_jsonl(d / "test.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(7)])
    with pytest.raises(DataError, match=r"has no training file.*need_train=False"):
        load_data(d)
    data = load_data(d, need_train=False)
    assert data.labels == ("a", "b")
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 0, "validation": 0, "test": 7}
    assert data.split("test").texts == tuple(f"t{i}" for i in range(7))
    with pytest.raises(
        DataError,
        match=r"few_shot: the train split of 'only_test' \(the source has none\) is empty",
    ):
        few_shot(data.split("train"), 2, label_names=data.labels)
    write_jsonl(d / "test.jsonl", [])
    write_jsonl(d / "dev.jsonl", [{"text": "v", "label": "x"}, {"text": "w", "label": "y"}])
    data = load_data(d, need_train=False)
    assert len(data.split("validation")) == 2 and len(data.split("test")) == 0


def test_a_folder_without_any_data_file_says_what_it_holds(tmp_path: Path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"has no data file: .*it holds: notes\.txt"):
        load_data(d, need_train=False)


def test_a_single_file_is_scored_whole(tmp_path: Path, caplog):
    rows = [{"text": f"t{i}", "label": "abc"[i % 3]} for i in range(30)]
    f = write_jsonl(tmp_path / "score.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="peftkit.data"):
        data = load_data(f, need_train=False, labels=["c", "b", "a"])
    assert "all 30 rows are the test split" in caplog.text
    test = data.split("test")
    assert test.texts == tuple(r["text"] for r in rows)  # every row, in the file's order
    assert [data.labels[y] for y in test.labels] == [r["label"] for r in rows]
    assert len(data.split("train")) == len(data.split("validation")) == 0
    assert len(load_data(f).split("test")) == 3  # for training, a carved tenth


# ---------------------------------------------------------------------------- descriptions


INTENTS = tuple(f"intent_{i:03d}" for i in range(151))


def test_descriptions_missing_labels_name_their_origin_and_the_fallback():
    from peftkit.prompting.templates import load_prompt_set
    from peftkit.training.prototypes import Prototypes, describe_labels

    support = Split(INTENTS[:4], (0, 1, 2, 3))
    where = "adapter.head_init.prompt: 'sentiment'"
    with pytest.raises(DataError) as err:
        Prototypes(support, INTENTS, load_prompt_set("sentiment").describe(), where=where)
    message = str(err.value)
    assert message.startswith(f"the label descriptions from {where} have no entry for label(s)")
    assert "(151 of the data's 151 labels; they describe: negative, positive)" in message
    assert "adapter.head_init.prompt=null" in message
    assert "'intent_009', ... (151 of" in message and "intent_010" not in message  # a preview
    with pytest.raises(DataError, match=r"from prompt set 'sentiment' \("):
        describe_labels(load_prompt_set("sentiment"), ["negative", "neutral"])
    # no descriptions: the label names describe themselves; no prior: none are needed
    assert describe_labels(None, INTENTS[:2]) == {lab: [lab] for lab in INTENTS[:2]}
    assert Prototypes(support, INTENTS, {"x": "y"}, prior=0.0).labels == INTENTS


def test_prototype_head_checks_descriptions_before_embedding():
    from peftkit.training.prototypes import prototype_head

    support = Split(("a", "b"), (0, 1))
    # base=None: the check must come before anything touches a model
    with pytest.raises(DataError, match=r"from my descriptions have no entry for label\(s\) 'b'"):
        prototype_head(None, support, ("a", "b"), {"a": "first"}, where="my descriptions")
