"""``peftkit adapters`` as a user runs it: lost and damaged indexes, verify / doctor /
rebuild, links in an imported folder, a read-only registry. Every refusal is one line
and exit 1, never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import peftkit.registry.index as index_mod
from peftkit.cli import main
from peftkit.registry.store import Registry


def _adapter(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "seed": seed}))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(512))
    save_file({"weight": torch.zeros(2, 4)}, str(folder / "head.safetensors"))
    return folder


@pytest.fixture()
def root(tmp_path) -> Path:
    reg = Registry(tmp_path / "reg")
    for i, name in enumerate(["sst2", "sst2", "trec"]):
        reg.register(
            name,
            _adapter(tmp_path / f"src{i}", i),
            method="lora",
            labels=["a", "b"],
            base_fingerprint="fp",
        )
    reg.close()
    return reg.root


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_a_lost_index_is_listed_empty_reported_and_rebuilt(root, capsys):
    weights = sorted(root.rglob("*.safetensors"))
    (root / "index.sqlite").write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        Path(f"{root / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    reg = ["adapters", "--registry", root]

    assert run([*reg, "list"], capsys)[0] == 0
    assert sorted(root.rglob("*.safetensors")) == weights  # nothing deleted
    code, out, _ = run([*reg, "doctor"], capsys)
    assert code == 1 and out.count("unindexed-folder:") == 3 and "rebuild" in out
    code, out, _ = run([*reg, "rebuild"], capsys)
    assert code == 0 and "re-indexed sst2@1" in out and "re-indexed trec@1" in out
    code, out, _ = run([*reg, "list"], capsys)
    assert code == 0 and all(ref in out for ref in ("sst2@1", "sst2@2", "trec@1"))
    code, out, _ = run([*reg, "doctor", "--json"], capsys)
    assert code == 0 and json.loads(out)["healthy"] is True


def test_verify_one_or_all_exits_1_on_a_changed_file(root, capsys):
    reg = ["adapters", "--registry", root]
    code, out, _ = run([*reg, "verify"], capsys)
    assert code == 0 and "3 checked, healthy" in out
    with open(root / "adapters" / "trec" / "1" / "adapter_model.safetensors", "r+b") as fh:
        fh.write(b"\x00\x01")
    assert run([*reg, "verify", "sst2@1"], capsys)[0] == 0
    code, out, _ = run([*reg, "verify", "trec"], capsys)
    assert code == 1 and "files-differ: trec@1" in out and "adapter_model.safetensors" in out
    code, out, _ = run([*reg, "verify", "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["ok"] == ["sst2@1", "sst2@2"]
    assert [p["where"] for p in report["problems"]] == ["trec@1"]


def test_a_damaged_index_is_one_line_and_rebuild_moves_it_aside(root, capsys):
    index = root / "index.sqlite"
    index.write_bytes(b"garbage " * 512)
    reg = ["adapters", "--registry", root]
    for action in (["list"], ["show", "sst2"], ["rm", "sst2"]):
        code, _, err = run([*reg, *action], capsys)
        assert code == 1 and "is damaged" in err and "rebuild" in err
        assert err.count("\n") == 1
    code, out, _ = run([*reg, "doctor"], capsys)
    assert code == 1 and "damaged-index" in out
    code, out, _ = run([*reg, "rebuild"], capsys)
    assert code == 0 and "moved the damaged index to" in out and "3 re-indexed, healthy" in out
    assert [p.read_bytes()[:8] for p in root.glob("index.sqlite.damaged-*")] == [b"garbage "]
    assert run([*reg, "verify", "sst2@2"], capsys)[0] == 0


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_import_of_a_folder_with_a_link_is_refused(root, tmp_path, capsys):
    (tmp_path / "secret").write_text("root:x:0:0")
    folder = _adapter(tmp_path / "evil", 9)
    (folder / "peftkit.json").write_text(
        json.dumps({"name": "evil", "labels": ["a", "b"], "base_fingerprint": "fp"})
    )
    (folder / "notes.txt").symlink_to(tmp_path / "secret")
    code, _, err = run(["adapters", "--registry", root, "import", folder], capsys)
    assert code == 1 and "symbolic links: notes.txt" in err
    assert not list(root.rglob("notes.txt"))


def test_a_registry_that_cannot_be_written_lists_but_refuses_rm(root, capsys, monkeypatch):
    monkeypatch.setattr(index_mod.os, "access", lambda path, mode, **kw: mode != os.W_OK)
    reg = ["adapters", "--registry", root]
    code, out, _ = run([*reg, "list"], capsys)
    assert code == 0 and "trec@1" in out
    code, _, err = run([*reg, "rm", "trec"], capsys)
    assert code == 1 and "is read-only" in err
    monkeypatch.undo()
    assert (root / "adapters" / "trec" / "1").is_dir()
