"""``Registry.doctor()`` and ``peftkit adapters doctor`` read the journal too, and only read
it: a torn last line is a warning, a bad line a problem by number, a journal that is a link
or not a file a problem (never followed), and what the index and a replay of the journal
disagree on (an alias moved, added or dropped behind the journal's back, a promotion the
index lost) one line each with the rebuild that restores it. No journal yet: nothing."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from test_registry import META, make_adapter

from peftkit.cli import main
from peftkit.registry.journal import JOURNAL_FILE
from peftkit.registry.promotions import new as new_promotion
from peftkit.registry.store import Registry


@pytest.fixture()
def reg(tmp_path, monkeypatch) -> Registry:
    monkeypatch.setenv("PEFTKIT_USER", "ana")
    registry = Registry(tmp_path / "registry")
    for seed in range(3):
        registry.register("sst2", make_adapter(tmp_path / f"src{seed}", seed), **META)
    registry.alias("sst2@1", "production")
    return registry


def _journal(reg: Registry) -> Path:
    return reg.root / JOURNAL_FILE


def _promote(reg: Registry, candidate: str, expected: str, *, passed: bool) -> None:
    figures = {"accuracy": {"candidate": 0.91, "current": 0.88}}
    decision = new_promotion(
        "sst2",
        "production",
        candidate,
        expected,
        passed=passed,
        gate="g",
        figures=figures,
        reason="ok",
    )
    reg.decide_promotion(decision, expected=expected)


def _index(reg: Registry, *statements: str) -> None:
    """Change the index behind the journal's back, as another tool (or an old peftkit) would."""
    conn = sqlite3.connect(reg.root / "index.sqlite")
    with conn:
        for sql in statements:
            conn.execute(sql)
    conn.close()


def _untouched(reg: Registry) -> tuple[bytes, dict, list]:
    return _journal(reg).read_bytes(), reg.aliases(), reg.promotions("sst2")


def test_a_healthy_registry_with_a_history_is_healthy_and_nothing_is_written(reg):
    reg.alias("sst2@3", "canary")
    reg.unalias("sst2", "canary")
    _promote(reg, "sst2@2", "sst2@1", passed=True)
    _promote(reg, "sst2@3", "sst2@2", passed=False)
    reg.set_metrics("sst2@2", {"f1": 0.7})
    reg.set_metrics("sst2@3", {"accuracy": 0.5}, replace=True)
    reg.remove("sst2@3")
    before = _untouched(reg)
    report = reg.doctor()
    assert report.healthy and report.warnings == (), report.lines()
    assert report.lines()[-1].endswith("2 checked, healthy")
    assert _untouched(reg) == before
    assert Registry(reg.root, read_only=True).doctor().healthy


def test_no_journal_yet_is_nothing_to_report_and_doctor_does_not_write_one(reg):
    reg.close()
    _journal(reg).unlink()  # as a peftkit from before the journal left it
    old = Registry(reg.root, read_only=True)  # a writable opening would write it
    report = old.doctor()
    assert report.healthy and report.warnings == (), report.lines()
    assert not os.path.lexists(_journal(reg))


def test_a_torn_last_line_is_a_warning_and_the_journal_stays_byte_identical(reg):
    with open(_journal(reg), "ab") as fh:  # a crash in the middle of an append
        fh.write(b'{"v":1,"id":"abc","at":"2025-01-01T00:00:00","event":"alias","name":"ss')
    before, stamp = _untouched(reg), os.stat(_journal(reg)).st_mtime_ns
    report = reg.doctor()
    assert report.healthy, report.lines()
    assert [(w.kind, w.where) for w in report.warnings] == [("journal-torn", f"{_journal(reg)}:2")]
    assert "warning: journal-torn: " in "\n".join(report.lines())
    assert _untouched(reg) == before and os.stat(_journal(reg)).st_mtime_ns == stamp


def test_a_bad_line_is_a_problem_by_its_number(reg):
    reg.alias("sst2@2", "canary")
    lines = _journal(reg).read_text().splitlines()
    bad = json.dumps({"v": 1, "id": "x", "at": "", "event": "alias", "name": "../x"})
    _journal(reg).write_text("\n".join([lines[0], "not json", bad, *lines[1:]]) + "\n")
    before = _untouched(reg)
    report = reg.doctor()
    assert [(p.kind, p.where) for p in report.problems] == [
        ("journal-line", f"{_journal(reg)}:2"),
        ("journal-line", f"{_journal(reg)}:3"),
    ]
    assert "invalid adapter name" in report.problems[1].detail
    assert all("\n" not in line for line in report.lines())
    assert _untouched(reg) == before


def test_what_the_index_changed_behind_the_journals_back_is_named(reg):
    _promote(reg, "sst2@2", "sst2@1", passed=False)
    reg.alias("sst2@3", "canary")
    _index(
        reg,
        "UPDATE aliases SET version = 3 WHERE alias = 'production'",  # moved
        "DELETE FROM aliases WHERE alias = 'canary'",  # dropped
        "INSERT INTO aliases VALUES ('sst2', 'staging', 2, '2025-01-01')",  # added
        "DELETE FROM promotions",  # lost
    )
    before = _untouched(reg)
    report = reg.doctor()
    assert sorted((p.kind, p.where) for p in report.problems) == [
        ("journal-differs", "sst2@canary"),
        ("journal-differs", "sst2@production"),  # the alias moved
        ("journal-differs", "sst2@production"),  # the promotion record lost
        ("journal-lacks", "sst2@staging"),
    ]
    details = [f"{p.kind} {p.where}: {p.detail}" for p in report.problems]
    assert any(
        d.startswith(
            "journal-differs sst2@production: the journal has it at sst2@1, the index at sst2@3"
        )
        for d in details
    )
    assert any(
        d.startswith("journal-differs sst2@canary:") and "index lacks it" in d for d in details
    )
    assert any(
        d.startswith(
            "journal-differs sst2@production: the journal records the promotion "
            "decision sst2@2 refused"
        )
        for d in details
    )
    assert any(
        d.startswith("journal-lacks sst2@staging: the index has it at sst2@2") for d in details
    )
    assert all("'peftkit adapters rebuild'" in p.detail for p in report.problems)
    assert _untouched(reg) == before  # doctor wrote nothing

    # the rebuild restores the journal's and journals the index's; then all agree
    assert reg.rebuild_index().healthy
    assert reg.aliases() == {
        "sst2@canary": "sst2@3",
        "sst2@production": "sst2@1",
        "sst2@staging": "sst2@2",
    }
    assert reg.doctor().healthy, reg.doctor().lines()


def test_a_journal_that_is_a_link_or_no_file_is_a_problem_never_followed(reg, tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(b"not json\n")
    kept = _journal(reg).read_bytes()
    _journal(reg).unlink()
    _journal(reg).symlink_to(outside)
    report = reg.doctor()
    assert [(p.kind, p.where) for p in report.problems] == [("journal-file", str(_journal(reg)))]
    assert "is a symbolic link" in report.problems[0].detail  # and "not json" never read
    assert outside.read_bytes() == b"not json\n" and _journal(reg).is_symlink()
    _journal(reg).unlink()
    _journal(reg).mkdir()
    report = reg.doctor()
    assert [p.kind for p in report.problems] == ["journal-file"]
    assert "not a regular file" in report.problems[0].detail
    _journal(reg).rmdir()
    _journal(reg).write_bytes(kept)
    assert reg.doctor().healthy


def test_a_lost_index_reports_folders_and_the_aliases_a_rebuild_brings_back(reg):
    with open(_journal(reg), "ab") as fh:
        fh.write(b'{"v":1,')
    reg.close()
    index = reg.root / "index.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    index.unlink()
    fresh = Registry(reg.root)
    report = fresh.doctor()
    assert [p.kind for p in report.problems] == ["unindexed-folder"] * 3 + ["journal-differs"]
    assert "re-index that version's folder" in report.problems[-1].detail
    assert [w.kind for w in report.warnings] == ["journal-torn"]
    fresh.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    index.write_bytes(b"garbage " * 512)  # damaged: the journal's own lines still reported
    damaged = Registry(reg.root).doctor()
    assert [p.kind for p in damaged.problems] == ["damaged-index"]
    assert [w.kind for w in damaged.warnings] == ["journal-torn"]


def test_the_cli_doctor_prints_the_journals_lines(reg, capsys):
    _index(reg, "UPDATE aliases SET version = 2 WHERE alias = 'production'")
    with open(_journal(reg), "ab") as fh:
        fh.write(b'{"v":1,')
    before = _journal(reg).read_bytes()
    root = ["adapters", "--registry", str(reg.root)]
    assert main([*root, "doctor"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith(
            "journal-differs: sst2@production: the journal has it at sst2@1, the "
            "index at sst2@2; 'peftkit adapters rebuild' restores it"
        )
        for line in out
    ), out
    assert any(line.startswith(f"warning: journal-torn: {_journal(reg)}:2: ") for line in out)
    assert out[-1].endswith("3 checked, 1 problem(s)")
    assert main([*root, "doctor", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [p["kind"] for p in report["problems"]] == ["journal-differs"]
    assert [w["kind"] for w in report["warnings"]] == ["journal-torn"]
    assert _journal(reg).read_bytes() == before
