"""Registry aliases: ``name@production`` points at one version, moved atomically, seen by
every reader from its next lookup, shown by the CLI; a version an alias holds is not removed."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from safetensors.numpy import save_file
from test_registry import META, make_adapter

from peftkit.cli import main
from peftkit.errors import ConfigError, RegistryError
from peftkit.registry.store import Registry


@pytest.fixture()
def reg(tmp_path) -> Registry:
    registry = Registry(tmp_path / "registry")
    for seed in range(3):
        folder = make_adapter(tmp_path / f"src{seed}", seed)
        head = {"weight": np.zeros((2, 4), np.float32), "bias": np.zeros(2, np.float32)}
        save_file(head, str(folder / "head.safetensors"))
        task = {"method": "lora", "labels": list(META["labels"]), "pooling": "mean"}
        (folder / "task.json").write_text(json.dumps({**task, "max_length": 8, "hidden_size": 4}))
        registry.register("sst2", folder, **META)
    return registry


def test_an_alias_moves_atomically_and_a_second_reader_sees_it(reg):
    reader = Registry(reg.root, read_only=True)
    assert reg.alias("sst2@2", "production") == (None, "sst2@2")
    assert reader.get("sst2@production").ref == "sst2@2"
    seen = reader.generation()
    assert reg.alias("sst2@3", "production") == ("sst2@2", "sst2@3")
    assert reader.generation() != seen  # a server's cheap check says it moved
    assert reader.get("sst2@production").ref == "sst2@3"
    assert reader.resolve("sst2@production") == "sst2@3" and reader.resolve("sst2@1") == "sst2@1"
    reg.alias("sst2", "canary")  # a bare name: its latest now
    assert reg.aliases() == {"sst2@canary": "sst2@3", "sst2@production": "sst2@3"}
    assert reg.verify("sst2@production").ref == "sst2@3"
    # one row per (name, alias), in the index itself
    rows = sqlite3.connect(reg.root / "index.sqlite").execute("SELECT * FROM aliases").fetchall()
    assert sorted(r[:3] for r in rows) == [("sst2", "canary", 3), ("sst2", "production", 3)]
    assert reg.unalias("sst2", "canary") == "sst2@3"
    assert list(reg.aliases("sst2")) == ["sst2@production"]


def test_bad_and_unknown_aliases_are_one_line_errors(reg):
    reg.alias("sst2@1", "production")
    with pytest.raises(RegistryError, match="no alias 'prod' for adapter 'sst2'; its aliases"):
        reg.get("sst2@prod")
    for bad in ("latest", "1x", "-a", "a/b", "x" * 65):
        with pytest.raises(ConfigError, match="invalid alias"):
            reg.alias("sst2@1", bad)
    with pytest.raises(RegistryError, match="no version 9"):
        reg.alias("sst2@9", "production")
    assert reg.get("sst2@production").ref == "sst2@1"  # a refused move changed nothing
    with pytest.raises(RegistryError, match="no alias 'staging'"):
        reg.unalias("sst2", "staging")


def test_a_version_an_alias_holds_is_not_removed(reg):
    reg.alias("sst2@2", "production")
    with pytest.raises(RegistryError, match="alias 'production' points at.*nothing was removed"):
        reg.remove("sst2@2")
    with pytest.raises(RegistryError, match="alias 'production'"):
        reg.remove("sst2", all_versions=True)
    assert [e.version for e in reg.list("sst2")] == [1, 2, 3]
    assert [e.ref for e in reg.remove("sst2@3")] == ["sst2@3"]  # not held: removed
    reg.alias("sst2@1", "production")
    assert [e.ref for e in reg.remove("sst2@2")] == ["sst2@2"]  # the alias moved off it


def test_aliases_survive_a_rebuild_of_an_intact_index(reg):
    reg.alias("sst2@2", "production")
    reg.rebuild_index()
    assert reg.get("sst2@production").ref == "sst2@2"


def test_an_older_index_gains_the_alias_table_in_place(tmp_path, reg):
    conn = sqlite3.connect(reg.root / "index.sqlite")
    conn.execute("DROP TABLE aliases")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    old = Registry(reg.root, read_only=True)  # read-only v2: no aliases, lookups still work
    assert old.aliases() == {} and old.get("sst2").ref == "sst2@3"
    with pytest.raises(RegistryError, match="no alias 'production'"):
        old.get("sst2@production")
    upgraded = Registry(reg.root)
    upgraded.alias("sst2@1", "production")
    assert upgraded.get("sst2@production").ref == "sst2@1"


def test_the_cli_moves_lists_shows_and_drops_aliases(reg, capsys):
    root = str(reg.root)
    assert main(["adapters", "--registry", root, "alias", "sst2@2", "production"]) == 0
    assert capsys.readouterr().out.strip() == "sst2@production: (new) -> sst2@2"
    assert main(["adapters", "--registry", root, "alias", "sst2@3", "production"]) == 0
    assert capsys.readouterr().out.strip() == "sst2@production: sst2@2 -> sst2@3"
    assert main(["adapters", "--registry", root, "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "aliases" in table[0]
    assert [line.split()[:2] for line in table if line.startswith("sst2@3")] == [
        ["sst2@3", "production"]
    ]
    assert main(["adapters", "--registry", root, "show", "sst2@production"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 3 and shown["aliases"] == ["production"]
    assert main(["adapters", "--registry", root, "rm", "sst2@3"]) == 1
    assert "alias 'production' points at" in capsys.readouterr().err
    assert main(["adapters", "--registry", root, "alias", "sst2@1", "latest"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid alias 'latest'" in err
    assert main(["adapters", "--registry", root, "unalias", "sst2", "production"]) == 0
    assert "it pointed at sst2@3" in capsys.readouterr().out
