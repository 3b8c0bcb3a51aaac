"""The registry's journal (journal.jsonl): aliases, promotion decisions, metrics set after
registration and removals survive a lost or damaged index, because rebuild_index() replays
them; a torn last line is a warning, a bad line a problem by number, an alias at a version
whose folder is gone is dropped and reported, and a symlinked journal is refused."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
from test_registry import META, make_adapter

from peftkit.cli import main
from peftkit.errors import RegistryError
from peftkit.registry.journal import JOURNAL_FILE, Journal
from peftkit.registry.promotions import new as new_promotion
from peftkit.registry.store import Registry


@pytest.fixture()
def reg(tmp_path) -> Registry:
    registry = Registry(tmp_path / "registry")
    for seed in range(3):
        registry.register("sst2", make_adapter(tmp_path / f"src{seed}", seed), **META)
    return registry


def _journal(reg: Registry) -> Path:
    return reg.root / JOURNAL_FILE


def _events(reg: Registry) -> list[dict]:
    return [json.loads(line) for line in _journal(reg).read_text().splitlines()]


def _lose_index(reg: Registry, how: str = "deleted") -> None:
    """What a lost index (a backup without it) or a damaged one leaves."""
    reg.close()
    index = reg.root / "index.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    if how == "deleted":
        index.unlink()
    else:
        index.write_bytes(b"garbage " * 512)


def _promote(reg, candidate, expected, *, passed, alias="production", reason="ok"):
    figures = {"accuracy": {"candidate": 0.91, "current": 0.88}}
    decision = new_promotion(
        "sst2", alias, candidate, expected, passed=passed, gate="g", figures=figures, reason=reason
    )
    return reg.decide_promotion(decision, expected=expected)


def _history(reg: Registry) -> dict:
    """Everything the journal must bring back."""
    return {
        "aliases": reg.aliases(),
        "promotions": reg.promotions("sst2"),
        "metrics": {e.ref: e.metrics for e in reg.list()},
    }


@pytest.mark.parametrize("how", ["deleted", "damaged"])
def test_a_lost_or_damaged_index_gets_aliases_promotions_and_metrics_back(reg, how, monkeypatch):
    monkeypatch.setenv("PEFTKIT_USER", "ana")
    reg.alias("sst2@1", "production")
    reg.alias("sst2@3", "canary")
    reg.unalias("sst2", "canary")  # dropped: must stay dropped
    assert _promote(reg, "sst2@2", "sst2@1", passed=True).passed
    assert not _promote(reg, "sst2@3", "sst2@2", passed=False, reason="worse").passed
    reg.set_metrics("sst2@2", {"f1": 0.7})
    reg.set_metrics("sst2@2", {"accuracy": 0.9})  # merged: both are kept
    reg.set_metrics("sst2@3", {"accuracy": 0.5}, replace=True)
    before = _history(reg)
    assert before["aliases"] == {"sst2@production": "sst2@2"}
    assert before["metrics"]["sst2@2"] == {"f1": 0.7, "accuracy": 0.9}
    _lose_index(reg, how)

    fresh = Registry(reg.root)
    assert how == "damaged" or fresh.aliases() == {}  # the new index knows nothing more
    report = fresh.rebuild_index()
    assert report.healthy and report.warnings == (), report.lines()
    assert sorted(report.added) == ["sst2@1", "sst2@2", "sst2@3"]
    assert (report.moved_aside is not None) == (how == "damaged")
    assert "alias sst2@production -> sst2@2" in report.restored
    assert sum(r.startswith("promotion sst2@production:") for r in report.restored) == 2
    assert {"metrics of sst2@2", "metrics of sst2@3"} <= set(report.restored)
    assert _history(fresh) == before  # order, who, when, gate, figures, reasons included
    again = Registry(reg.root)
    assert _history(again) == before and again.get("sst2@production").ref == "sst2@2"
    assert again.doctor().healthy
    # a second rebuild finds nothing to restore and writes nothing more to the journal
    lines = _journal(reg).read_bytes()
    assert again.rebuild_index().restored == () and _journal(reg).read_bytes() == lines
    # and the version counters stay above every version seen
    assert again.register("sst2", make_adapter(reg.root.parent / "n", 9), **META).ref == "sst2@4"


def test_the_cli_rebuild_prints_what_it_restored(reg, capsys):
    reg.alias("sst2@2", "production")
    _promote(reg, "sst2@3", "sst2@2", passed=False, reason="worse")
    _lose_index(reg)
    root = ["adapters", "--registry", str(reg.root)]
    assert main([*root, "rebuild"]) == 0
    out = capsys.readouterr().out
    assert "restored alias sst2@production -> sst2@2" in out
    assert "restored promotion sst2@production: sst2@3 refused" in out
    assert "3 re-indexed, 2 restored from the journal, healthy" in out
    _lose_index(Registry(reg.root))
    assert main([*root, "rebuild", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["restored"][0] == "alias sst2@production -> sst2@2" and report["healthy"]
    assert main([*root, "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in table if line.startswith("sst2@2")] == [
        ["sst2@2", "production"]
    ]
    assert Registry(reg.root).promotions("sst2")[0].reason == "worse"


def test_every_journal_line_is_one_json_event_appended_before_the_commit(reg, monkeypatch):
    reg.alias("sst2@1", "production")
    reg.set_metrics("sst2@1", {"f1": 0.5})
    events = _events(reg)
    assert [e["event"] for e in events] == ["alias", "metrics"]
    assert all(e["v"] == 1 and e["id"] and e["at"] for e in events)
    assert events[0] | {"id": "", "at": ""} == {
        "v": 1,
        "id": "",
        "at": "",
        "event": "alias",
        "name": "sst2",
        "alias": "production",
        "version": 1,
        "created": reg.get("sst2@1").created,
    }

    # a transaction that does not commit after its event was appended voids the event
    original = Journal.alias

    def then_fail(self, entry, alias):
        original(self, entry, alias)
        raise OSError("disk gone")

    monkeypatch.setattr(Journal, "alias", then_fail)
    with pytest.raises(OSError, match="disk gone"):
        reg.alias("sst2@3", "production")
    monkeypatch.undo()
    assert reg.get("sst2@production").ref == "sst2@1"
    voided = _events(reg)[-2:]
    assert [e["event"] for e in voided] == ["alias", "void"]
    assert voided[1]["of"] == voided[0]["id"]
    # a journal that cannot be written refuses the change: the index never gets ahead of it
    monkeypatch.setattr(
        os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(28, "No space"))
    )
    with pytest.raises(RegistryError, match=r"cannot append to the registry journal .*nothing"):
        reg.alias("sst2@2", "production")
    monkeypatch.undo()
    assert reg.get("sst2@production").ref == "sst2@1"
    _lose_index(reg)
    fresh = Registry(reg.root)
    fresh.rebuild_index()
    assert fresh.get("sst2@production").ref == "sst2@1"


def test_a_torn_last_line_is_skipped_with_a_warning(reg):
    reg.alias("sst2@2", "production")
    with open(_journal(reg), "ab") as fh:  # a crash in the middle of the next append
        fh.write(b'{"v":1,"id":"abc","at":"2025-01-01T00:00:00","event":"alias","name":"ss')
    torn_line = len(_journal(reg).read_bytes().splitlines())
    _lose_index(reg)
    fresh = Registry(reg.root)
    report = fresh.rebuild_index()
    assert report.healthy and fresh.get("sst2@production").ref == "sst2@2"
    assert [(w.kind, w.where) for w in report.warnings] == [
        ("journal-torn", f"{_journal(reg)}:{torn_line}")
    ]
    assert "warning: journal-torn" in "\n".join(report.lines())

    # the next append ends the torn line and marks it: still a warning, never a problem
    fresh.alias("sst2@3", "production")
    assert [e.get("event") for e in map(_loads, _journal(reg).read_text().splitlines()[-2:])] == [
        "torn",
        "alias",
    ]
    _lose_index(fresh)
    again = Registry(reg.root)
    report = again.rebuild_index()
    assert report.healthy and again.get("sst2@production").ref == "sst2@3"
    assert [(w.kind, w.where) for w in report.warnings] == [
        ("journal-torn", f"{_journal(reg)}:{torn_line}")
    ]


def _loads(line: str) -> dict:
    try:
        return json.loads(line)
    except ValueError:
        return {}


def test_a_malformed_line_is_reported_by_number_and_the_rest_replayed(reg):
    reg.alias("sst2@1", "production")
    reg.alias("sst2@2", "canary")
    lines = _journal(reg).read_text().splitlines()
    bad = ["not json", json.dumps({"v": 1, "id": "x", "at": "", "event": "alias", "name": "../x"})]
    bad.append(json.dumps({"v": 9, "event": "alias"}))
    _journal(reg).write_text("\n".join([lines[0], *bad, *lines[1:]]) + "\n")
    _lose_index(reg)
    fresh = Registry(reg.root)
    report = fresh.rebuild_index()
    assert not report.healthy
    assert [(p.kind, p.where.rsplit(":", 1)[1]) for p in report.problems] == [
        ("journal-line", "2"),
        ("journal-line", "3"),
        ("journal-line", "4"),
    ]
    assert "invalid adapter name" in report.problems[1].detail
    assert "format 9" in report.problems[2].detail
    assert fresh.aliases() == {"sst2@canary": "sst2@2", "sst2@production": "sst2@1"}


def test_an_alias_at_a_version_whose_folder_is_gone_is_dropped_and_reported(reg, tmp_path):
    reg.alias("sst2@3", "production")
    reg.alias("sst2@3", "canary")
    reg.alias("sst2@1", "canary")
    _lose_index(reg)
    shutil.rmtree(reg.root / "adapters" / "sst2" / "3")  # deleted by hand meanwhile
    fresh = Registry(reg.root)
    report = fresh.rebuild_index()
    assert [(p.kind, p.where) for p in report.problems] == [("alias-dropped", "sst2@production")]
    assert "sst2@3, which is not in the registry" in report.problems[0].detail
    assert fresh.aliases() == {"sst2@canary": "sst2@1"}
    assert "alias-dropped: sst2@production" in "\n".join(report.lines())


def test_a_removed_version_is_never_handed_out_again_after_a_lost_index(reg, tmp_path):
    reg.set_metrics("sst2@3", {"f1": 0.1})
    reg.remove("sst2@3")
    _lose_index(reg)
    fresh = Registry(reg.root)
    report = fresh.rebuild_index()
    assert report.healthy and report.restored == ()  # sst2@3's metrics went with it
    entry = fresh.register("sst2", make_adapter(tmp_path / "new", 7), **META)
    assert entry.ref == "sst2@4" and entry.metrics == {}


def test_a_symlinked_journal_is_refused_and_never_written_through(reg, tmp_path):
    reg.alias("sst2@1", "production")
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(_journal(reg).read_bytes())
    _journal(reg).unlink()
    _journal(reg).symlink_to(outside)
    kept = outside.read_bytes()
    with pytest.raises(RegistryError, match=r"journal .*journal.jsonl is a symbolic link") as err:
        reg.alias("sst2@2", "production")
    assert "\n" not in str(err.value)
    assert reg.get("sst2@production").ref == "sst2@1"  # nothing half-written
    with pytest.raises(RegistryError, match="symbolic link"):
        reg.set_metrics("sst2@1", {"f1": 1.0})
    assert reg.get("sst2@1").metrics == {}
    _lose_index(reg, "damaged")
    fresh = Registry(reg.root)  # opening reads as before
    with pytest.raises(RegistryError, match="symbolic link"):
        fresh.rebuild_index()
    assert fresh.doctor().problems[0].kind == "damaged-index"  # not moved aside either
    assert main(["adapters", "--registry", str(reg.root), "rebuild"]) == 1
    assert outside.read_bytes() == kept and _journal(reg).is_symlink()


def test_a_registry_from_before_the_journal_writes_one_when_it_opens(reg, monkeypatch):
    monkeypatch.setenv("PEFTKIT_USER", "ana")
    reg.alias("sst2@1", "production")
    _promote(reg, "sst2@2", "sst2@1", passed=True)
    reg.set_metrics("sst2@1", {"f1": 0.3})
    reg.close()
    before = _history(reg)
    _journal(reg).unlink()  # as an older peftkit left it
    Registry(reg.root).close()
    assert sorted(e["event"] for e in _events(reg)) == ["alias", "metrics", "promotion"]
    _lose_index(reg)
    fresh = Registry(reg.root)
    assert fresh.rebuild_index().healthy and _history(fresh) == before
    assert fresh.get("sst2@production").ref == "sst2@2"


def test_rebuild_journals_what_an_intact_index_holds_and_the_journal_lacks(reg):
    reg.alias("sst2@1", "production")
    conn = sqlite3.connect(reg.root / "index.sqlite")  # as an older peftkit writes
    with conn:
        conn.execute("UPDATE aliases SET version = 3 WHERE alias = 'production'")
        conn.execute("INSERT INTO aliases VALUES ('sst2', 'canary', 2, '2025-01-01')")
    conn.close()
    report = reg.rebuild_index()  # the journal wins where it has a say
    assert report.restored == ("alias sst2@production -> sst2@1",)
    assert reg.aliases() == {"sst2@canary": "sst2@2", "sst2@production": "sst2@1"}
    assert [e["alias"] for e in _events(reg)] == ["production", "canary"]
    _lose_index(reg)
    fresh = Registry(reg.root)
    fresh.rebuild_index()
    assert fresh.aliases() == {"sst2@canary": "sst2@2", "sst2@production": "sst2@1"}


def test_a_stale_index_from_a_backup_catches_up_with_the_journal(reg, monkeypatch):
    monkeypatch.setenv("PEFTKIT_USER", "ana")
    reg.alias("sst2@1", "production")
    reg.close()
    backup = reg.root.parent / "backup.sqlite"
    shutil.copy(reg.root / "index.sqlite", backup)  # checkpointed on close: complete
    _promote(reg, "sst2@2", "sst2@1", passed=True)
    _promote(reg, "sst2@3", "sst2@2", passed=False)
    before = _history(reg)
    _lose_index(reg)
    shutil.copy(backup, reg.root / "index.sqlite")
    restored = Registry(reg.root)
    assert restored.get("sst2@production").ref == "sst2@1"  # what the backup knew
    report = restored.rebuild_index()
    assert len(report.restored) == 3 and _history(restored) == before


def test_two_promotions_racing_for_one_alias_one_wins_and_both_are_journaled(reg):
    reg.alias("sst2@1", "production")
    start, decided = threading.Barrier(2), {}

    def go(candidate: str) -> None:
        mine = Registry(reg.root)  # its own connection, as another process would have
        start.wait()
        decided[candidate] = _promote(mine, candidate, "sst2@1", passed=True)
        mine.close()

    threads = [threading.Thread(target=go, args=(c,)) for c in ("sst2@2", "sst2@3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(d.decision for d in decided.values()) == ["passed", "refused"]
    winner = next(c for c, d in decided.items() if d.passed)
    assert reg.get("sst2@production").ref == winner
    promotions = [e["promotion"]["decision"] for e in _events(reg) if e["event"] == "promotion"]
    assert promotions == ["passed", "refused"]  # in commit order, nothing half-written
    before = _history(reg)
    _lose_index(reg)
    fresh = Registry(reg.root)
    fresh.rebuild_index()
    assert _history(fresh) == before and fresh.get("sst2@production").ref == winner
