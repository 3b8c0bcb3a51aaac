"""The registry never destroys what it did not write: lost, damaged and read-only indexes,
links and stray files in adapter folders, metadata that disagrees with the files, run ids
and the generation counter."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import peftkit.registry.index as index_mod
import peftkit.registry.staging as staging_mod
from peftkit.errors import ConfigError, IntegrityError, RegistryError
from peftkit.registry.store import Registry

META = dict(method="lora", labels=("neg", "pos"), base_fingerprint="fp-a")


def make_adapter(folder: Path, seed: int = 0, labels: int = 2, task: dict | None = None) -> Path:
    """A folder shaped like what peftkit training saves: peft files, a real head, task.json."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["query"], "seed": seed}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    rng = __import__("random").Random(seed)
    (folder / "adapter_model.safetensors").write_bytes(rng.randbytes(2048))
    torch.manual_seed(seed)
    save_file(
        {"weight": torch.randn(labels, 8), "bias": torch.zeros(labels)},
        str(folder / "head.safetensors"),
    )
    if task is not None:
        (folder / "task.json").write_text(json.dumps(task))
    return folder


def _files(root: Path) -> dict[str, bytes]:
    """Every adapter file under the registry's adapters/ (relative path -> bytes)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted((root / "adapters").rglob("*"))
        if p.is_file() and p.name != "peftkit.json"
    }


def _drop_index(root: Path) -> None:
    """What a backup that copies index.sqlite without its -wal (or a lost index) leaves."""
    (root / "index.sqlite").write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        Path(f"{root / 'index.sqlite'}{suffix}").unlink(missing_ok=True)


@pytest.fixture()
def filled(tmp_path) -> Registry:
    reg = Registry(tmp_path / "registry")
    reg.register("sst2", make_adapter(tmp_path / "a", 0), **META, metrics={"accuracy": 0.9})
    reg.register("sst2", make_adapter(tmp_path / "b", 1), **META, run_id="run-b")
    reg.register(
        "trec", make_adapter(tmp_path / "c", 2, labels=3), **{**META, "labels": list("abc")}
    )
    return reg


# -- 1. opening deletes nothing it did not stage ---------------------------------------------


def test_a_lost_index_deletes_nothing_and_rebuild_brings_every_entry_back(filled, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(filled.root, copy)
    before = _files(copy)
    assert sum(k.endswith(".safetensors") for k in before) == 6
    _drop_index(copy)

    lost = Registry(copy)
    assert lost.list() == []  # opening and listing ...
    assert _files(copy) == before  # ... removed nothing
    report = lost.doctor()
    assert not report.healthy
    assert sorted(p.kind for p in report.problems) == ["unindexed-folder"] * 3
    assert all("rebuild" in p.detail for p in report.problems)

    rebuilt = lost.rebuild_index()
    assert sorted(rebuilt.added) == ["sst2@1", "sst2@2", "trec@1"] and rebuilt.healthy
    again = Registry(copy)
    assert [e.ref for e in again.list()] == ["sst2@1", "sst2@2", "trec@1"]
    for old, new in zip(filled.list(), again.list(), strict=True):
        assert (new.files, new.labels, new.metrics, new.run_id, new.created) == (
            old.files,
            old.labels,
            old.metrics,
            old.run_id,
            old.created,
        )
        assert again.load_path(new.ref, expected_fingerprint="fp-a") == new
    assert again.find_run("run-b").ref == "sst2@2"
    assert again.doctor().healthy
    # the version counters are above every folder found: no version is handed out twice
    assert again.register("sst2", make_adapter(tmp_path / "d", 3), **META).ref == "sst2@3"


def test_a_stale_index_never_overwrites_a_folder_it_lost(filled, tmp_path):
    filled.close()
    _drop_index(filled.root)
    fresh = Registry(filled.root)
    entry = fresh.register("sst2", make_adapter(tmp_path / "new", 9), **META)
    assert entry.ref == "sst2@3"  # above the two folders the index no longer lists
    assert (filled.root / "adapters" / "sst2" / "1" / "head.safetensors").is_file()


def test_unknown_folders_missing_folders_and_changed_files_are_reported(filled):
    root = filled.root
    stray = root / "adapters" / "sst2" / "7"
    stray.mkdir()
    (stray / "weights.safetensors").write_bytes(b"someone's file")
    shutil.rmtree(root / "adapters" / "trec" / "1")
    with open(root / "adapters" / "sst2" / "1" / "adapter_model.safetensors", "r+b") as fh:
        fh.write(b"\x00\x00")

    reopened = Registry(root)
    assert (stray / "weights.safetensors").read_bytes() == b"someone's file"  # kept
    report = reopened.doctor()
    kinds = {
        (p.kind, p.where.split("/")[-1] if "/" in p.where else p.where) for p in report.problems
    }
    assert kinds == {
        ("unindexed-folder", "7"),
        ("missing-folder", "trec@1"),
        ("files-differ", "sst2@1"),
    }
    assert report.ok == ("sst2@2",)
    assert reopened.check("sst2@2").healthy and not reopened.check("sst2@1").healthy
    # a rebuild indexes nothing it cannot trust, and deletes nothing either
    rebuilt = reopened.rebuild_index()
    assert rebuilt.added == () and stray.is_dir()
    assert [p.kind for p in rebuilt.problems] == ["unindexed-folder"]


def test_a_folder_marked_by_another_registry_is_left_alone(filled):
    folder = filled.root / "adapters" / "other" / "1"
    folder.mkdir(parents=True)
    (folder / ".peftkit-pending").write_text(json.dumps({"registry": "someone-else"}))
    Registry(filled.root)
    assert folder.is_dir()
    assert [p.kind for p in Registry(filled.root).doctor().problems] == ["unfinished"]


def test_a_removal_killed_after_its_commit_is_finished_on_the_next_open(filled, monkeypatch):
    path = filled.get("sst2@1").path

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(staging_mod, "remove_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        filled.remove("sst2@1")
    assert path.is_dir() and [e.ref for e in filled.list("sst2")] == ["sst2@2"]
    monkeypatch.undo()
    Registry(filled.root)  # the folder carries this registry's marker and has no row
    assert not path.exists() and filled.doctor().healthy


def test_a_removal_failing_before_its_commit_keeps_the_entry_whole(filled, monkeypatch):
    original = staging_mod.write_marker

    def fail_after(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(staging_mod, "write_marker", fail_after)
    with pytest.raises(KeyboardInterrupt):
        filled.remove("trec")
    monkeypatch.undo()
    assert filled.verify("trec") and not (filled.get("trec").path / ".peftkit-pending").exists()
    assert Registry(filled.root).doctor().healthy


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_remove_never_deletes_outside_adapters(filled, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(filled.root / "adapters" / "trec", outside)
    shutil.rmtree(filled.root / "adapters" / "trec")
    (filled.root / "adapters" / "trec").symlink_to(outside)
    filled.remove("trec")
    assert (outside / "1" / "head.safetensors").is_file()
    assert not (outside / "1" / ".peftkit-pending").exists()


# -- 3. only an adapter folder's regular files are copied --------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_import_refuses_links_and_copies_nothing(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("root:x:0:0")
    folder = make_adapter(tmp_path / "src")
    (folder / "peftkit.json").write_text(json.dumps({"name": "evil", **META, "labels": ["a", "b"]}))
    (folder / "notes.txt").symlink_to(secret)
    reg = Registry(tmp_path / "registry")
    with pytest.raises(ConfigError, match="symbolic links: notes.txt"):
        reg.import_folder(folder)
    with pytest.raises(ConfigError, match="symbolic links: notes.txt"):
        reg.register("evil", folder, **META)
    (folder / "notes.txt").unlink()
    (folder / "head.safetensors").rename(tmp_path / "head")
    (folder / "head.safetensors").symlink_to(tmp_path / "head")
    with pytest.raises(ConfigError, match="symbolic links: head.safetensors"):
        reg.import_folder(folder)
    assert reg.list() == []
    assert not any(
        b"root:x" in p.read_bytes()
        for p in tmp_path.rglob("*")
        if p.is_file() and "registry" in p.parts
    )


def test_only_the_files_of_an_adapter_folder_are_copied(tmp_path, caplog):
    folder = make_adapter(tmp_path / "src", task={"method": "lora", "labels": ["neg", "pos"]})
    (folder / "notes.txt").write_text("hello")
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.safetensors").write_bytes(b"x")
    reg = Registry(tmp_path / "registry")
    with caplog.at_level(logging.WARNING, logger="peftkit.registry"):
        entry = reg.register("sst2", folder, **META)
    assert set(entry.files) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "head.safetensors",
        "task.json",
    }
    assert {p.name for p in entry.path.iterdir()} == set(entry.files) | {"peftkit.json"}
    assert "adapter_model.bin, notes.txt, sub/x.safetensors" in caplog.text


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_export_never_writes_through_or_reads_a_link(filled, tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "dest").symlink_to(tmp_path / "target")
    with pytest.raises(RegistryError, match="not an empty folder"):
        filled.export("sst2@1", tmp_path / "dest")
    assert list((tmp_path / "target").iterdir()) == []
    stored = filled.get("sst2@1").path / "adapter_config.json"
    stored.rename(tmp_path / "moved.json")
    stored.symlink_to(tmp_path / "moved.json")
    with pytest.raises(IntegrityError, match="a symbolic link"):
        filled.export("sst2@1", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_to_an_unwritable_place_is_a_registry_error(filled, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RegistryError, match="cannot export sst2@2 to .*file/out"):
        filled.export("sst2", tmp_path / "file" / "out")


# -- 4. imported metadata is checked against the files ----------------------------------------


@pytest.mark.parametrize(
    "saved, task, message",
    [
        ({"labels": ["neg", "pos"]}, None, r"head.safetensors has 5 output rows .* 2 labels"),
        (
            {"labels": ["a", "b", "c", "d", "e"]},
            {"labels": ["v", "w", "x", "y", "z"]},
            r"labels \['a', 'b', 'c', 'd', 'e'\] but task.json gives \['v', 'w', 'x', 'y', 'z'\]",
        ),
        (
            {"labels": list("abcde"), "method": "lora"},
            {"labels": list("abcde"), "method": "ia3"},
            r"method 'lora' but task.json gives 'ia3'",
        ),
        (
            {"labels": list("abcde")},
            {"labels": list("abcde"), "base_fingerprint": "fp-other"},
            r"base_fingerprint 'fp-a' but task.json records 'fp-other'",
        ),
    ],
)
def test_imported_metadata_must_agree_with_task_json_and_the_head(tmp_path, saved, task, message):
    folder = make_adapter(tmp_path / "src", labels=5, task=task)
    (folder / "peftkit.json").write_text(
        json.dumps({"name": "x", "method": "lora", "base_fingerprint": "fp-a", **saved})
    )
    reg = Registry(tmp_path / "registry")
    with pytest.raises(IntegrityError, match=message):
        reg.import_folder(folder)
    assert reg.list() == [] and list((reg.root / "tmp").iterdir()) == []


def test_an_agreeing_import_is_accepted(tmp_path):
    task = {"method": "lora", "labels": list("abcde")}
    folder = make_adapter(tmp_path / "src", labels=5, task=task)
    entry = Registry(tmp_path / "r").import_folder(
        folder, "five", labels=list("abcde"), base_fingerprint="fp-a"
    )
    assert entry.labels == tuple("abcde")


# -- 5. read-only registries -------------------------------------------------------------------


def _assert_reads_work_and_writes_are_refused(reg: Registry, tmp_path: Path, why: str) -> None:
    t0 = time.monotonic()
    assert [e.ref for e in reg.list()] == ["sst2@1", "sst2@2", "trec@1"]
    assert reg.load_path("sst2", expected_fingerprint="fp-a").ref == "sst2@2"
    assert reg.find_run("run-b").ref == "sst2@2" and isinstance(reg.generation(), int)
    assert reg.check().healthy
    assert time.monotonic() - t0 < 5  # no 30 s wait for the WAL switch
    src = make_adapter(tmp_path / "ro-src", 5)
    for write in (
        lambda: reg.register("new", src, **META),
        lambda: reg.remove("sst2@1"),
        lambda: reg.set_metrics("sst2", {"f1": 1.0}),
        lambda: reg.import_folder(src, "new", labels=["a", "b"], base_fingerprint="x"),
        reg.rebuild_index,
    ):
        with pytest.raises(RegistryError, match=f"is read-only: {why}"):
            write()


def test_read_only_registry_reads_and_refuses_writes(filled, tmp_path):
    filled.close()

    def listing() -> list[str]:  # SQLite's own -wal / -shm may come and go
        return sorted(p.name for p in filled.root.iterdir() if not p.name.endswith(("wal", "shm")))

    before = listing()
    reg = Registry(filled.root, read_only=True)
    assert reg.read_only and "read_only=True" in repr(reg)
    _assert_reads_work_and_writes_are_refused(reg, tmp_path, "it was opened with read_only=True")
    assert [e.ref for e in reg.list()] == ["sst2@1", "sst2@2", "trec@1"]
    assert listing() == before


def test_unwritable_registry_opens_read_only(filled, tmp_path, monkeypatch):
    # root ignores file modes, so "cannot write here" is simulated where peftkit asks
    def access(path, mode, *args, **kwargs):
        return mode != os.W_OK and os.path.exists(path)

    monkeypatch.setattr(index_mod.os, "access", access)
    reg = Registry(filled.root)
    assert reg.read_only
    _assert_reads_work_and_writes_are_refused(reg, tmp_path, "its folder or index.sqlite cannot")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file modes")
def test_chmod_read_only_registry_reads(filled, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(filled.root, copy)
    for p in [copy, *copy.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        _assert_reads_work_and_writes_are_refused(Registry(copy), tmp_path, "its folder")
    finally:
        for p in [copy, *copy.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


def test_read_only_without_an_index_says_so(tmp_path):
    with pytest.raises(RegistryError, match="read-only and has no index.sqlite"):
        Registry(tmp_path / "nothing", read_only=True)


# -- 6. a damaged index ------------------------------------------------------------------------


def _damage(index: Path) -> None:
    """Overwrite bytes in the middle of the index file (its pages, not its header)."""
    size = index.stat().st_size
    with open(index, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(os.urandom(min(8192, size // 3)))


def test_damaged_index_is_named_writes_are_refused_and_rebuild_moves_it_aside(tmp_path):
    reg = Registry(tmp_path / "registry")
    src = make_adapter(tmp_path / "src")
    for i in range(40):
        reg.register(f"task{i:02d}", src, **META, metrics={"notes": "x" * 400})
    reg.close()
    Registry(reg.root).close()  # the last connection checkpoints the WAL
    index = reg.root / "index.sqlite"
    assert not Path(f"{index}-wal").exists() or Path(f"{index}-wal").stat().st_size == 0
    _damage(index)
    damaged = Registry(reg.root)
    with pytest.raises(RegistryError, match=r"index .* is damaged .*'peftkit adapters"):
        damaged.list()
    with pytest.raises(RegistryError, match="is damaged"):
        damaged.register("more", src, **META)
    fresh = Registry(reg.root)  # another object: its first write checks the file first
    with pytest.raises(RegistryError, match="is damaged"):
        fresh.register("more", src, **META)
    assert fresh.doctor().problems[0].kind == "damaged-index"

    report = fresh.rebuild_index()
    aside = Path(report.moved_aside)
    assert aside.name.startswith("index.sqlite.damaged-") and aside.read_bytes()
    assert len(report.added) == 40 and report.healthy
    assert [e.ref for e in Registry(reg.root).list()] == [f"task{i:02d}@1" for i in range(40)]
    assert Registry(reg.root).doctor().healthy


def test_garbage_index_file_is_named_and_rebuilt(filled):
    filled.close()
    index = filled.root / "index.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    index.write_bytes(b"not a database" * 100)
    reg = Registry(filled.root)
    with pytest.raises(RegistryError, match="is damaged"):
        reg.get("sst2")
    assert sorted(reg.rebuild_index().added) == ["sst2@1", "sst2@2", "trec@1"]
    assert reg.get("sst2").run_id == "run-b"


# -- 7. run ids and the schema migration -------------------------------------------------------


def test_find_run_returns_what_a_run_registered(filled, tmp_path):
    assert filled.find_run("run-b").ref == "sst2@2"
    assert filled.find_run("run-b", name="trec") is None and filled.find_run("nope") is None
    assert filled.get("sst2@1").run_id is None
    filled.register(
        "trec",
        make_adapter(tmp_path / "t", 4, labels=3),
        **{**META, "labels": list("abc")},
        run_id="run-b",
    )
    assert filled.find_run("run-b").ref == "trec@2"
    assert filled.find_run("run-b", name="sst2").ref == "sst2@2"
    with pytest.raises(ConfigError, match="run_id must be"):
        filled.register("x", tmp_path / "t", **META, run_id="")


def _v1_index(root: Path, src: Path) -> None:
    """An index as peftkit wrote it before run ids (schema version 1), with one entry."""
    (root / "adapters" / "old" / "1").mkdir(parents=True)
    files = {}
    for f in src.iterdir():
        shutil.copy(f, root / "adapters" / "old" / "1" / f.name)
        files[f.name] = __import__("hashlib").sha256(f.read_bytes()).hexdigest()
    conn = sqlite3.connect(root / "index.sqlite")
    conn.execute("CREATE TABLE names (name TEXT PRIMARY KEY COLLATE NOCASE, last_version INTEGER)")
    conn.execute(
        "CREATE TABLE entries (name TEXT NOT NULL, version INTEGER NOT NULL, method TEXT NOT NULL,"
        " task TEXT NOT NULL, labels TEXT NOT NULL, base_fingerprint TEXT NOT NULL, base TEXT NOT"
        " NULL, quantization TEXT, template TEXT, verbalizer TEXT, metrics TEXT NOT NULL, files"
        " TEXT NOT NULL, tags TEXT NOT NULL, created TEXT NOT NULL, PRIMARY KEY (name, version))"
    )
    conn.execute("INSERT INTO names VALUES ('old', 1)")
    conn.execute(
        "INSERT INTO entries VALUES ('old', 1, 'lora', '', '[\"neg\", \"pos\"]', 'fp-a', '{}',"
        " NULL, NULL, NULL, '{}', ?, '[]', '2024-01-01T00:00:00.000+00:00')",
        (json.dumps(files),),
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


def test_a_v1_index_reads_read_only_and_migrates_keeping_its_rows(tmp_path):
    root = tmp_path / "registry"
    _v1_index(root, make_adapter(tmp_path / "src"))
    ro = Registry(root, read_only=True)
    assert ro.get("old").run_id is None and ro.find_run("x") is None
    assert isinstance(ro.generation(), int)
    reg = Registry(root)
    assert reg.verify("old@1").run_id is None
    assert (reg.get("old").path / "peftkit.json").exists() is False  # until a rebuild
    assert reg.rebuild_index().added == () and (reg.get("old").path / "peftkit.json").is_file()
    entry = reg.register("old", make_adapter(tmp_path / "n", 1), **META, run_id="r2")
    assert entry.ref == "old@2" and reg.find_run("r2") == entry
    assert sqlite3.connect(root / "index.sqlite").execute("PRAGMA user_version").fetchone() == (4,)


# -- 8. the generation ---------------------------------------------------------------------


def test_generation_changes_with_every_committed_write_and_only_then(filled, tmp_path):
    other = Registry(filled.root)  # another connection sees the same counter
    g0 = filled.generation()
    filled.list(), filled.get("sst2"), filled.verify("sst2")
    assert filled.generation() == g0 == other.generation()
    filled.set_metrics("sst2", {"f1": 0.5})
    g1 = other.generation()
    assert g1 != g0
    filled.register("sst2", make_adapter(tmp_path / "n", 7), **META)
    g2 = other.generation()
    filled.remove("sst2")
    assert len({g0, g1, g2, other.generation()}) == 4
    with pytest.raises(RegistryError):
        filled.remove("missing")  # a refused write commits nothing
    assert filled.generation() == other.generation()
