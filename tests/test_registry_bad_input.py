"""Bad input to the registry, as a user gives it: a folder that is not a registry, version
numbers too large for the index, a journal line or a version folder with such a number, an
index that is a folder, and names that are not registered. Each is one line and exit 1 (or
a reported problem), never a traceback, and nothing is written where peftkit did not write."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from test_cli_adapters import run

from peftkit.errors import ConfigError, RegistryError
from peftkit.registry.store import Registry

META = dict(method="lora", labels=("neg", "pos"), base_fingerprint="fp-a")
HUGE = "99999999999999999999999"  # above SQLite's largest INTEGER (2**63 - 1)


def _adapter(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "seed": seed}))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(512))
    (folder / "head.safetensors").write_bytes(os.urandom(64))
    return folder


@pytest.fixture()
def root(tmp_path) -> Path:
    """A registry holding sst2@1, sst2@2 and trec@1, with sst2@production -> sst2@1."""
    reg = Registry(tmp_path / "reg")
    for i, name in enumerate(["sst2", "sst2", "trec"]):
        reg.register(name, _adapter(tmp_path / f"src{i}", i), **META)
    reg.alias("sst2@1", "production")
    reg.close()
    return reg.root


def _tree(folder: Path) -> list[str]:
    """Every path under ``folder`` but SQLite's -wal / -shm (opening an index makes them)."""
    paths = (str(p.relative_to(folder)) for p in folder.rglob("*"))
    return sorted(p for p in paths if not p.endswith(("-wal", "-shm")))


# -- 1. a folder that is not a registry ----------------------------------------------------------


@pytest.fixture()
def docs(tmp_path) -> Path:
    folder = tmp_path / "docs"
    (folder / "notes").mkdir(parents=True)
    (folder / "a.txt").write_text("hi")
    (folder / "notes" / "b.txt").write_text("there")
    return folder


@pytest.mark.parametrize(
    "action",
    [
        ["list"],
        ["show", "x"],
        ["verify"],
        ["doctor"],
        ["rebuild"],
        ["rm", "x"],
        ["alias", "x", "p"],
    ],
)
def test_a_folder_of_other_files_is_refused_and_left_as_it_is(docs, capsys, action):
    before = _tree(docs)
    code, out, err = run(["adapters", "--registry", docs, *action], capsys)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "is not a peftkit registry" in err and "a.txt" in err and "empty or new folder" in err
    assert _tree(docs) == before  # no adapters/, tmp/, index.sqlite or journal.jsonl


@pytest.mark.parametrize("read_only", [False, True])
def test_the_api_refuses_a_folder_of_other_files_before_creating_anything(docs, read_only):
    before = _tree(docs)
    with pytest.raises(RegistryError, match="is not a peftkit registry.*a.txt, notes"):
        Registry(docs, read_only=read_only)
    assert _tree(docs) == before


def test_importing_into_a_folder_of_other_files_writes_nothing(docs, tmp_path, capsys):
    before = _tree(docs)
    folder = _adapter(tmp_path / "src", 0)
    code, _, err = run(["adapters", "--registry", docs, "import", folder, "--name", "x"], capsys)
    assert code == 1 and "is not a peftkit registry" in err and _tree(docs) == before


def test_importing_a_missing_folder_creates_no_registry(tmp_path, capsys):
    new = tmp_path / "new"
    code, _, err = run(["adapters", "--registry", new, "import", tmp_path / "nothere"], capsys)
    assert code == 1 and "does not exist or is not a folder" in err and not new.exists()


def test_an_empty_or_missing_folder_becomes_a_registry(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing" / "deeper"):
        reg = Registry(folder)
        assert reg.list() == [] and (folder / "index.sqlite").is_file()
        reg.close()
    (tmp_path / "cli").mkdir()
    assert run(["adapters", "--registry", tmp_path / "cli", "list"], capsys)[0] == 0
    assert (tmp_path / "cli" / "index.sqlite").is_file()


def test_a_registry_that_lost_its_index_still_opens_and_rebuilds(root):
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    report = Registry(root).rebuild_index()
    assert sorted(report.added) == ["sst2@1", "sst2@2", "trec@1"]
    assert "alias sst2@production -> sst2@1" in report.restored


# -- 2. version numbers too large for the index --------------------------------------------------


@pytest.mark.parametrize(
    "action",
    [
        ["show", f"sst2@{HUGE}"],
        ["verify", f"sst2@{HUGE}"],
        ["rm", f"sst2@{HUGE}"],
        ["alias", f"sst2@{HUGE}", "staging"],
        ["export", f"sst2@{HUGE}", "out"],
        ["promote", f"sst2@{HUGE}", "--alias", "production", "--gate", "accuracy on x >= 0.5"],
        ["show", "sst2@9223372036854775808"],  # 2**63: one above the largest
        ["show", "sst2@" + "9" * 5000],  # more digits than int() reads
    ],
)
def test_a_version_too_large_is_a_one_line_error_naming_the_ref(root, capsys, action, tmp_path):
    before = _tree(root)
    code, out, err = run(["adapters", "--registry", root, *action], capsys)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert "bad adapter reference 'sst2@" in err and "9223372036854775807" in err
    assert _tree(root) == before and not (tmp_path / "out").exists()


def test_the_largest_version_is_looked_up_and_not_found(root):
    reg = Registry(root)
    with pytest.raises(RegistryError, match="has no version 9223372036854775807"):
        reg.get("sst2@9223372036854775807")
    for bad in (f"sst2@{HUGE}", "sst2@0", "sst2@000"):
        with pytest.raises(ConfigError, match="version number runs from 1 to"):
            reg.get(bad)
    assert reg.get("sst2@0002").version == 2  # leading zeros still name the version


# -- 3. a journal line or a version folder with such a version -----------------------------------


def test_rebuild_skips_an_out_of_range_journal_line_and_reports_such_a_folder(root, capsys):
    line = {
        "v": 1,
        "id": "zz2",
        "at": "2026-01-01T00:00:00+00:00",
        "event": "removed",
        "name": "sst2",
        "version": int(HUGE),
        "created": "",
    }
    with open(root / "journal.jsonl", "a") as journal:
        journal.write(json.dumps(line) + "\n")
    (root / "adapters" / "sst2" / HUGE).mkdir()
    (root / "adapters" / "trec" / "0").mkdir()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / 'index.sqlite'}{suffix}").unlink(missing_ok=True)

    code, out, _ = run(["adapters", "--registry", root, "rebuild"], capsys)
    assert code == 1
    assert "journal-line:" in out and "is not a version number" in out
    assert f"unindexed-folder: {root / 'adapters' / 'sst2' / HUGE}:" in out
    assert f"unindexed-folder: {root / 'adapters' / 'trec' / '0'}:" in out
    assert "3 re-indexed" in out and "restored alias sst2@production -> sst2@1" in out
    assert (root / "adapters" / "sst2" / HUGE).is_dir()  # reported, left as it is

    reg = Registry(root)
    assert [e.ref for e in reg.list()] == ["sst2@1", "sst2@2", "trec@1"]
    assert reg.register("sst2", _adapter(root.parent / "next", 9), **META).version == 3
    code, out, _ = run(["adapters", "--registry", root, "doctor"], capsys)
    assert code == 1 and out.count("unindexed-folder:") == 2 and "journal-line:" in out


def test_a_version_counter_at_the_largest_version_refuses_the_next_one(root, tmp_path):
    (root / "adapters" / "trec" / "9223372036854775807").mkdir()
    reg = Registry(root)
    with pytest.raises(RegistryError, match="used every version number"):
        reg.register("trec", _adapter(tmp_path / "next", 9), **META)
    assert [e.ref for e in reg.list("trec")] == ["trec@1"]


# -- 4. an index that is a folder ----------------------------------------------------------------


def test_doctor_on_an_index_that_is_a_folder_reports_no_hard_links(tmp_path, capsys):
    root = tmp_path / "reg"
    (root / "index.sqlite").mkdir(parents=True)
    code, out, err = run(["adapters", "--registry", root, "doctor"], capsys)
    assert code == 1 and "damaged-index" in out
    assert "hard link" not in out + err


# -- 5. names that are not registered, and what the messages name --------------------------------


def test_listing_an_unknown_name_is_an_error_like_show(root, capsys):
    code, out, err = run(["adapters", "--registry", root, "list", "sst3"], capsys)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert "no adapter named 'sst3'" in err and "did you mean 'sst2'" in err
    code, _, err = run(["adapters", "--registry", root, "list", "sst2", "--tag", "x"], capsys)
    assert code == 0 and "no adapters of 'sst2' tagged 'x'" in err


def test_unalias_of_an_unknown_name_says_there_is_no_such_adapter(root, capsys):
    code, _, err = run(["adapters", "--registry", root, "unalias", "sst3", "production"], capsys)
    assert code == 1 and "no adapter named 'sst3'" in err and "has no aliases" not in err
    code, _, err = run(["adapters", "--registry", root, "unalias", "trec", "production"], capsys)
    assert code == 1 and "no alias 'production' for adapter 'trec'" in err
    code, _, err = run(["adapters", "--registry", root, "show", "sst3@production"], capsys)
    assert code == 1 and "no adapter named 'sst3'" in err


def test_cli_messages_name_the_cli_command(root, capsys):
    weights = root / "adapters" / "trec" / "1" / "adapter_model.safetensors"
    weights.write_bytes(b"changed")
    code, out, _ = run(["adapters", "--registry", root, "verify", "trec@1"], capsys)
    assert code == 1 and "peftkit adapters rm trec@1" in out
    (root / "adapters" / "sst2" / "2" / "peftkit.json").unlink()
    code, out, _ = run(["adapters", "--registry", root, "doctor"], capsys)
    assert code == 1 and "no-metadata" in out and "run 'peftkit adapters rebuild'" in out
    code, _, err = run(["adapters", "--registry", root, "rm", "sst2@1", "--all"], capsys)
    assert code == 1 and "peftkit adapters rm sst2 --all" in err


def test_rebuild_says_once_that_it_moved_the_damaged_index(root, capsys, caplog):
    (root / "index.sqlite").write_bytes(b"not a database, " * 512)
    for suffix in ("-wal", "-shm"):
        Path(f"{root / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    code, out, err = run(["adapters", "--registry", root, "rebuild"], capsys)
    assert code == 0 and (out + err).count("moved the damaged index") == 1
    # a warning would print it again on stderr (logging's last-resort handler)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [m for m in warned if "moved the damaged index" in m]
