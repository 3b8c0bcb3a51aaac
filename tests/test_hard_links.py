"""peftkit never writes through a link it did not make: a registry journal or index with
another hard link is refused before anything is written (a ``cp -al`` backup stays as it
was), a run folder whose lock file has another hard link is refused before the lock is
truncated, and a file planted where an atomic write puts its temporary file (a symbolic or
a hard link) is replaced by name, never written through."""

from __future__ import annotations

import os

import pytest
from test_registry import META, make_adapter

from peftkit.errors import ConfigError, RegistryError
from peftkit.paths import atomic_write_text
from peftkit.registry.journal import JOURNAL_FILE
from peftkit.registry.store import Registry
from peftkit.run.folders import LOCK_FILE, lock_run_dir


@pytest.fixture()
def reg(tmp_path) -> Registry:
    registry = Registry(tmp_path / "registry")
    for seed in range(2):
        registry.register("sst2", make_adapter(tmp_path / f"src{seed}", seed), **META)
    registry.alias("sst2@1", "production")
    return registry


def test_a_hard_linked_journal_is_refused_and_the_other_name_keeps_its_bytes(reg, tmp_path):
    backup = tmp_path / "backup-journal.jsonl"
    os.link(reg.root / JOURNAL_FILE, backup)
    kept = backup.read_bytes()
    with pytest.raises(RegistryError, match=r"journal .* has 2 hard links") as err:
        reg.alias("sst2@2", "production")
    assert "\n" not in str(err.value)
    assert reg.get("sst2@production").ref == "sst2@1"  # nothing half-written
    assert backup.read_bytes() == kept
    report = reg.doctor()  # the doctor names it, and writes nothing either
    assert [p.kind for p in report.problems] == ["journal-file"]
    assert "hard links" in report.problems[0].detail
    # the fix the message gives: a file of its own
    own = reg.root / "journal.own"
    own.write_bytes((reg.root / JOURNAL_FILE).read_bytes())
    own.replace(reg.root / JOURNAL_FILE)
    reg.alias("sst2@2", "production")
    assert reg.get("sst2@production").ref == "sst2@2" and backup.read_bytes() == kept


def test_a_hard_linked_index_is_refused_for_writes_and_named_by_the_doctor(reg, tmp_path):
    reg.close()
    backup = tmp_path / "index-backup.sqlite"
    os.link(reg.root / "index.sqlite", backup)
    kept = backup.read_bytes()
    opened = Registry(reg.root)
    assert opened.get("sst2@production").ref == "sst2@1"  # reading works
    with pytest.raises(RegistryError, match=r"index .*index.sqlite has 2 hard links"):
        opened.alias("sst2@2", "production")
    with pytest.raises(RegistryError, match="hard links"):
        opened.register("sst2", make_adapter(tmp_path / "src9", 9), **META)
    assert [e.ref for e in opened.list()] == ["sst2@1", "sst2@2"]
    assert [p.kind for p in opened.doctor().problems] == ["link"]
    opened.close()
    assert backup.read_bytes() == kept


def test_a_run_folder_whose_lock_has_another_hard_link_is_refused_untouched(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    precious = tmp_path / "notes.txt"
    precious.write_text("my notes\n")
    os.link(precious, run / LOCK_FILE)
    refused = pytest.raises(ConfigError, match=rf"run folder .*{LOCK_FILE} has 2 hard links")
    with refused, lock_run_dir(run):
        pass
    assert precious.read_text() == "my notes\n"


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "file"])
def test_an_atomic_write_never_touches_a_file_planted_at_its_temporary_name(
    tmp_path, kind, monkeypatch
):
    """Whatever holds the temporary name drawn (a link, a user's own file) is neither
    written through nor removed: another name is drawn."""
    import peftkit.paths

    names = iter(["planted", "fresh"])
    monkeypatch.setattr(peftkit.paths, "_token", lambda: next(names))
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    target = tmp_path / "run" / "metrics.json"
    target.parent.mkdir()
    planted = target.with_name(f".{target.name}.planted.tmp")
    if kind == "symlink":
        planted.symlink_to(precious)
    elif kind == "hardlink":
        os.link(precious, planted)
    else:
        planted.write_text("a user's file\n")
    atomic_write_text(target, '{"accuracy": 1.0}\n')
    assert precious.read_text() == "keep me\n"
    assert target.read_text() == '{"accuracy": 1.0}\n' and not target.is_symlink()
    assert os.path.lexists(planted)  # left as it was
    if kind == "file":
        assert planted.read_text() == "a user's file\n"
    assert not (target.parent / ".metrics.json.fresh.tmp").exists()  # renamed into place


def test_a_failed_atomic_write_removes_only_its_own_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old\n")

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_failed_atomic_write_leaves_a_file_moved_over_its_temporary_name(tmp_path, monkeypatch):
    """Between the temporary file's creation and the failure, another process moves its own
    file in under that name: the cleanup removes only the inode this write created."""
    target = tmp_path / "metrics.json"
    theirs = tmp_path / "theirs.txt"
    theirs.write_text("another process's file\n")

    def swap_then_fail(src, dst):
        os.rename(theirs, src)  # their file now holds the temporary name
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", swap_then_fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, "new\n")
    monkeypatch.undo()
    (kept,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert kept.read_text() == "another process's file\n"
    assert not target.exists()
