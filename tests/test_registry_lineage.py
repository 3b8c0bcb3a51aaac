"""Registry schema v4: each entry's lineage and calibration (given, or read from the
folder's task.json), kept through export/import and a rebuild of a lost index; the
promotion decisions table; a v3 index migrated in place keeping its entries and aliases."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from test_registry import META, make_adapter

from peftkit.cli import main
from peftkit.errors import ConfigError
from peftkit.registry.promotions import new as new_promotion
from peftkit.registry.store import Registry

CALIBRATION = {
    "temperature": 1.7,
    "threshold": 0.62,
    "target": {"precision": 0.9},
    "out_of_scope": None,
    "ece_before": 0.12,
    "ece_after": 0.03,
}
LINEAGE = {"parent": "sst2@1", "data": {"train": "sha256:abc", "replay": None}}


def peftkit_folder(folder: Path, seed: int = 0, calibration: dict | None = None) -> Path:
    """An adapter folder as save_pretrained writes it: files, a real head, task.json."""
    make_adapter(folder, seed)
    head = {"weight": np.zeros((2, 4), np.float32), "bias": np.zeros(2, np.float32)}
    save_file(head, str(folder / "head.safetensors"))
    task = {"method": "lora", "labels": list(META["labels"]), "pooling": "mean"}
    task.update(max_length=8, hidden_size=4, base_fingerprint=META["base_fingerprint"])
    if calibration is not None:
        task["calibration"] = calibration
    (folder / "task.json").write_text(json.dumps(task))
    return folder


@pytest.fixture()
def reg(tmp_path) -> Registry:
    registry = Registry(tmp_path / "registry")
    registry.register("sst2", peftkit_folder(tmp_path / "a", 0))
    registry.register(
        "sst2", peftkit_folder(tmp_path / "b", 1, CALIBRATION), lineage=LINEAGE, tags=["new"]
    )
    return registry


def test_lineage_and_calibration_round_trip_and_come_from_task_json(reg, tmp_path):
    first, second = reg.get("sst2@1"), reg.get("sst2@2")
    assert first.lineage is None and first.calibration is None
    assert second.lineage == LINEAGE and second.calibration == CALIBRATION  # from task.json
    assert second.to_dict()["calibration"]["temperature"] == 1.7
    other = Registry(reg.root, read_only=True)  # another reader, from the index itself
    assert other.get("sst2@2").lineage == LINEAGE
    # an argument wins over task.json
    given = {"temperature": 1.1, "threshold": None}
    third = reg.register("sst2", tmp_path / "b", calibration=given)
    assert third.calibration == given
    # the version folder's peftkit.json carries both: an export and import keeps them
    saved = json.loads((second.path / "peftkit.json").read_text())
    assert saved["lineage"] == LINEAGE and saved["calibration"] == CALIBRATION
    reg.export("sst2@2", tmp_path / "out")
    imported = reg.import_folder(tmp_path / "out", "copy")
    assert (imported.lineage, imported.calibration) == (LINEAGE, CALIBRATION)


def test_bad_lineage_or_calibration_is_a_config_error_naming_it(reg, tmp_path):
    with pytest.raises(ConfigError, match="lineage must be a mapping"):
        reg.register("sst2", tmp_path / "a", lineage=["sst2@1"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="calibration must hold JSON values"):
        reg.register("sst2", tmp_path / "a", calibration={"temperature": object()})
    bad = peftkit_folder(tmp_path / "bad", 3)
    task = json.loads((bad / "task.json").read_text())
    (bad / "task.json").write_text(json.dumps({**task, "calibration": 1.5}))
    with pytest.raises(ConfigError, match=r"calibration must be a mapping.*read from .*task.json"):
        reg.register("sst2", bad)
    assert [e.version for e in reg.list("sst2")] == [1, 2]  # nothing registered


def test_a_rebuild_of_a_lost_index_recovers_lineage_and_calibration(reg):
    reg.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{reg.root / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    fresh = Registry(reg.root)
    assert fresh.list() == []
    assert sorted(fresh.rebuild_index().added) == ["sst2@1", "sst2@2"]
    assert fresh.get("sst2@2").lineage == LINEAGE
    assert fresh.get("sst2@2").calibration == CALIBRATION
    assert fresh.get("sst2@1").calibration is None


def _to_v3(root: Path) -> None:
    """Turn a v4 index back into what peftkit wrote at schema version 3."""
    conn = sqlite3.connect(root / "index.sqlite")
    conn.execute("DROP TABLE promotions")
    conn.execute("ALTER TABLE entries DROP COLUMN lineage")
    conn.execute("ALTER TABLE entries DROP COLUMN calibration")
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()


def test_a_v3_index_is_migrated_in_place_keeping_entries_and_aliases(reg, tmp_path):
    reg.alias("sst2@1", "production")
    before = [(e.ref, e.files, e.tags, e.created) for e in reg.list()]
    reg.close()
    _to_v3(reg.root)
    old = Registry(reg.root, read_only=True)  # a read-only v3 index reads as before
    assert old.get("sst2@2").lineage is None and old.promotions("sst2") == []
    assert old.get("sst2@production").ref == "sst2@1"
    old.close()
    upgraded = Registry(reg.root)
    conn = sqlite3.connect(reg.root / "index.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone() == (4,)
    assert [(e.ref, e.files, e.tags, e.created) for e in upgraded.list()] == before
    assert upgraded.get("sst2@production").ref == "sst2@1"
    assert upgraded.get("sst2@2").lineage is None  # what the v3 row did not hold
    entry = upgraded.register("sst2", tmp_path / "b", lineage=LINEAGE)
    assert entry.ref == "sst2@3" and upgraded.get("sst2@3").lineage == LINEAGE
    assert upgraded.check().healthy


def test_promotion_decisions_are_listed_newest_first(reg, monkeypatch):
    monkeypatch.setenv("PEFTKIT_USER", "ana")
    figures = {"accuracy": {"candidate": 0.9, "current": None}}
    first = new_promotion(
        "sst2", "production", "sst2@1", None, passed=True, gate="g", figures=figures, reason="ok"
    )
    assert reg.decide_promotion(first, expected=None).passed
    assert reg.get("sst2@production").ref == "sst2@1"
    refused = new_promotion(
        "sst2", "production", "sst2@2", "sst2@1", passed=False, gate="g", figures={}, reason="no"
    )
    assert not reg.decide_promotion(refused, expected="sst2@1").passed
    assert reg.get("sst2@production").ref == "sst2@1"  # a refusal moves nothing
    listed = reg.promotions("sst2")
    assert [(p.candidate, p.decision, p.who) for p in listed] == [
        ("sst2@2", "refused", "ana"),
        ("sst2@1", "passed", "ana"),
    ]
    assert listed[1].figures == figures and listed[1].previous is None
    assert [p.candidate for p in reg.promotions("sst2", limit=1)] == ["sst2@2"]
    assert reg.promotions("other") == []


def test_a_passed_decision_whose_alias_moved_meanwhile_is_recorded_refused(reg):
    reg.alias("sst2@1", "production")
    late = new_promotion(
        "sst2", "production", "sst2@2", None, passed=True, gate="g", figures={}, reason="ok"
    )
    recorded = reg.decide_promotion(late, expected=None)  # it saw no alias when it began
    assert recorded.decision == "refused" and "moved from (none) to sst2@1" in recorded.reason
    assert reg.get("sst2@production").ref == "sst2@1"
    assert reg.promotions("sst2")[0].decision == "refused"


def test_adapters_show_prints_lineage_calibration_and_promotions(reg, capsys):
    promotion = new_promotion(
        "sst2", "production", "sst2@2", None, passed=True, gate="g", figures={"n": 3}, reason="ok"
    )
    reg.decide_promotion(promotion, expected=None)
    assert main(["adapters", "--registry", str(reg.root), "show", "sst2@2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["lineage"] == LINEAGE and shown["calibration"] == CALIBRATION
    assert shown["aliases"] == ["production"]
    assert [(p["candidate"], p["decision"], p["figures"]) for p in shown["promotions"]] == [
        ("sst2@2", "passed", {"n": 3})
    ]
    assert main(["adapters", "--registry", str(reg.root), "show", "sst2@1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["lineage"] is None and shown["calibration"] is None


_RACER = """
import sys, time
from pathlib import Path
from peftkit.registry.promotions import new
from peftkit.registry.store import Registry
root, ref, go = sys.argv[1:4]
reg = Registry(root)
promotion = new("sst2", "production", ref, "sst2@1", passed=True, gate="g", figures={}, reason="ok")
while not Path(go).exists():
    time.sleep(0.005)
print(reg.decide_promotion(promotion, expected="sst2@1").decision)
"""


def test_two_processes_moving_one_alias_at_once_one_wins(reg, tmp_path):
    import subprocess
    import sys

    reg.register("sst2", tmp_path / "a")  # sst2@3
    reg.alias("sst2@1", "production")
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(reg.root), ref, str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for ref in ("sst2@2", "sst2@3")
    ]
    go.touch()
    decisions = [p.communicate(timeout=120)[0].strip() for p in racers]
    assert sorted(decisions) == ["passed", "refused"]
    winner = ("sst2@2", "sst2@3")[decisions.index("passed")]
    assert reg.get("sst2@production").ref == winner
    recorded = {p.candidate: p.decision for p in reg.promotions("sst2")}
    assert recorded == dict(zip(("sst2@2", "sst2@3"), decisions, strict=True))
    assert "another promotion" in next(p for p in reg.promotions("sst2") if not p.passed).reason
