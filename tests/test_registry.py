"""The adapter registry: versions, lookups, integrity, crashes, concurrency, peft exchange."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import peftkit.registry.staging as staging_mod
from peftkit.errors import ConfigError, FingerprintMismatch, IntegrityError, RegistryError
from peftkit.registry.store import Registry

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_registry_worker.py")
META = dict(method="lora", labels=("neg", "pos"), base_fingerprint="fp-a")


def make_adapter(folder: Path, seed: int = 0, size: int = 4096) -> Path:
    """A folder shaped like peft's save_pretrained output (the registry treats bytes generically)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["query", "value"], "seed": seed}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    rng = __import__("random").Random(seed)
    (folder / "adapter_model.safetensors").write_bytes(rng.randbytes(size))
    (folder / "head.safetensors").write_bytes(rng.randbytes(256))
    return folder


@pytest.fixture()
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture()
def src(tmp_path) -> Path:
    return make_adapter(tmp_path / "src")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(reg: Registry) -> tuple[list[str], list[str]]:
    """(staging folders in tmp/, version folders under adapters/)."""
    stages = sorted(p.name for p in (reg.root / "tmp").iterdir())
    versions = sorted(str(p.relative_to(reg.root)) for p in (reg.root / "adapters").glob("*/*"))
    return stages, versions


# -- register / get / list ------------------------------------------------------------------


def test_register_get_list_and_version_refs(reg, src, tmp_path):
    other = make_adapter(tmp_path / "other", seed=1)
    e1 = reg.register(
        "sst2",
        src,
        **META,
        task="sentiment",
        template="Review: {text}",
        verbalizer={"neg": ["bad"], "pos": ["good"]},
        metrics={"accuracy": 0.5},
        base={"architecture": "bert:BertModel", "source": "tiny"},
        quantization="4bit",
        tags=["first"],
    )
    e2 = reg.register("sst2", other, **META, tags=["best"])
    reg.register(
        "ag_news", src, method="prefix_tuning", labels=["w", "s", "b", "t"], base_fingerprint="fp-a"
    )
    assert (e1.ref, e2.ref) == ("sst2@1", "sst2@2")
    assert reg.get("sst2") == e2 == reg.get("sst2@latest") == reg.get(e2)
    got = reg.get("sst2@1")
    assert got == e1
    assert got.labels == ("neg", "pos") and got.tags == ("first",)
    assert got.verbalizer == {"neg": ["bad"], "pos": ["good"]}
    assert (got.template, got.quantization, got.task) == ("Review: {text}", "4bit", "sentiment")
    assert got.base["source"] == "tiny" and got.metrics == {"accuracy": 0.5}
    assert got.path == reg.root / "adapters" / "sst2" / "1"
    assert got.files == {p.name: _sha(p) for p in src.iterdir()}
    stored = {p.name: p.read_bytes() for p in got.path.iterdir()}
    own = json.loads(stored.pop("peftkit.json"))  # the folder carries its own metadata
    assert stored == {p.name: p.read_bytes() for p in src.iterdir()}
    assert own["files"] == got.files and own["ref"] == "sst2@1" and own["labels"] == ["neg", "pos"]
    assert got.created.endswith("+00:00")
    assert [e.ref for e in reg.list()] == ["ag_news@1", "sst2@1", "sst2@2"]
    assert [e.ref for e in reg.list("sst2")] == ["sst2@1", "sst2@2"]
    assert [e.ref for e in reg.list(tag="best")] == ["sst2@2"]
    assert reg.list("nothing") == [] and reg.names() == ["ag_news", "sst2"]
    d = got.to_dict()
    assert d["ref"] == "sst2@1" and d["labels"] == ["neg", "pos"] and json.dumps(d)
    # a second Registry on the same root (a new process would do the same) sees it all
    assert [e.ref for e in Registry(reg.root).list()] == ["ag_news@1", "sst2@1", "sst2@2"]


def test_remove_and_versions_never_reused(reg, src):
    for _ in range(3):
        reg.register("sst2", src, **META)
    removed = reg.remove("sst2")  # the latest only
    assert [e.ref for e in removed] == ["sst2@3"] and not removed[0].path.exists()
    assert reg.register("sst2", src, **META).version == 4
    reg.remove("sst2@1")
    assert [e.version for e in reg.list("sst2")] == [2, 4]
    with pytest.raises(ConfigError, match="bare name"):
        reg.remove("sst2@2", all_versions=True)
    assert len(reg.remove("sst2", all_versions=True)) == 2
    assert reg.list() == [] and not (reg.root / "adapters" / "sst2" / "2").exists()
    with pytest.raises(RegistryError, match="empty"):
        reg.remove("sst2")


def test_unknown_names_and_versions_say_what_exists(reg, src):
    reg.register("sst2", src, **META)
    reg.register("sst2", src, **META)
    reg.register("banking77", src, **META)
    with pytest.raises(RegistryError, match=r"did you mean 'sst2'"):
        reg.get("sst")
    with pytest.raises(RegistryError, match=r"did you mean 'banking77'"):
        reg.load_path("bankin77@1")
    with pytest.raises(RegistryError, match=r"no version 7; its versions are 1, 2"):
        reg.get("sst2@7")
    with pytest.raises(RegistryError, match=r"no alias 'x' for adapter 'sst2'; 'sst2' has no"):
        reg.get("sst2@x")  # an alias reference, and sst2 has none
    for bad in ("sst2@1x", "sst2@0", "sst2@-1", "sst2@_a", "", "@1", 3):
        with pytest.raises(ConfigError):
            reg.get(bad)


@pytest.mark.parametrize("name", ["bad name", "a@1", "-x", ".hidden", "a/b", "x" * 129, ""])
def test_invalid_names_are_refused(reg, src, name):
    with pytest.raises(ConfigError, match="invalid adapter name"):
        reg.register(name, src, **META)
    assert reg.list() == []


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(labels="pos"), "list of strings"),
        (dict(labels=["a", "a"]), "distinct"),
        (dict(labels=["a", 1]), "non-empty strings"),
        (dict(base_fingerprint=""), "base_fingerprint must be a non-empty string"),
        (dict(method=""), "method must be a non-empty string"),
        (dict(method=None), "no method given and it has no task.json"),
        (dict(metrics={"f": object()}), "JSON"),
        (dict(verbalizer=["good"]), "verbalizer must be a mapping"),
    ],
)
def test_bad_metadata_is_refused(reg, src, change, message):
    with pytest.raises(ConfigError, match=message):
        reg.register("sst2", src, **{**META, **change})
    assert reg.list() == [] and _leftovers(reg) == ([], [])


def test_bad_folders_are_refused(reg, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        reg.register("a", tmp_path / "missing", **META)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is empty"):
        reg.register("a", tmp_path / "empty", **META)


# -- register(name, folder): the metadata from the folder's task.json ------------------------

TASK = {
    "method": "lora",
    "labels": ["neg", "pos"],
    "pooling": "cls",
    "max_length": 64,
    "hidden_size": 8,
    "template": "Review: {text}",
    "verbalizer": {"neg": "bad", "pos": "good"},
    "head_normalize": False,
    "start": None,
    "base_fingerprint": "fp-task",
    "base": {"architecture": "bert:BertModel", "source": "tiny"},
    "quantization": "4bit",
}


def saved_folder(folder: Path, task: dict | None = TASK, rows: int = 2) -> Path:
    """A folder as save_pretrained writes it, by hand: peft's files, a head, task.json."""
    from safetensors.numpy import save_file

    make_adapter(folder)
    head = {"weight": np.zeros((rows, 8), np.float32), "bias": np.zeros(rows, np.float32)}
    save_file(head, str(folder / "head.safetensors"))
    if task is not None:
        (folder / "task.json").write_text(json.dumps(task))
    return folder


def test_register_reads_the_folders_task_json(reg, tmp_path):
    entry = reg.register("sst2", saved_folder(tmp_path / "a"), metrics={"accuracy": 0.9})
    assert (entry.method, entry.labels, entry.base_fingerprint) == (
        "lora",
        ("neg", "pos"),
        "fp-task",
    )
    assert entry.base == TASK["base"] and entry.quantization == "4bit"
    assert (entry.template, entry.verbalizer) == ("Review: {text}", TASK["verbalizer"])
    assert (entry.task, entry.tags, entry.metrics) == ("", (), {"accuracy": 0.9})
    assert reg.get("sst2") == entry and reg.verify("sst2@1") == entry


def test_given_arguments_win_over_task_json(reg, tmp_path):
    folder = saved_folder(tmp_path / "a")
    entry = reg.register("sst2", folder, template="{text}", quantization="8bit", task="sentiment")
    assert (entry.template, entry.quantization, entry.task) == ("{text}", "8bit", "sentiment")
    assert entry.labels == ("neg", "pos")  # not given: task.json's
    with pytest.raises(IntegrityError, match="task.json gives"):  # still checked against it
        reg.register("sst2", folder, labels=["pos", "neg"])
    with pytest.raises(IntegrityError, match="task.json records 'fp-task'"):
        reg.register("sst2", folder, base_fingerprint="fp-other")
    assert [e.ref for e in reg.list()] == ["sst2@1"]


def test_register_names_what_neither_the_arguments_nor_task_json_give(reg, tmp_path):
    plain = saved_folder(tmp_path / "plain", task=None)
    with pytest.raises(ConfigError) as err:
        reg.register("sst2", plain)
    message = str(err.value)
    assert f"adapter folder {plain}: no method, labels, base_fingerprint given" in message
    assert "has no task.json" in message and "\n" not in message
    no_base = {k: v for k, v in TASK.items() if k not in ("base_fingerprint", "base")}
    folder = saved_folder(tmp_path / "no-base", task=no_base)
    with pytest.raises(
        ConfigError, match="no base_fingerprint given and its task.json records none"
    ):
        reg.register("sst2", folder)
    assert reg.register("sst2", folder, base_fingerprint="fp-b").labels == ("neg", "pos")
    bad = saved_folder(tmp_path / "bad", task={**TASK, "labels": "pos"})
    with pytest.raises(ConfigError, match=r"labels must be a list.*read from .*task\.json"):
        reg.register("sst2", bad)
    broken = saved_folder(tmp_path / "broken", task=None)
    (broken / "task.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="task.json cannot be read"):
        reg.register("sst2", broken)
    assert [e.ref for e in reg.list()] == ["sst2@1"] and _leftovers(reg)[0] == []


def test_register_from_task_json_imports_no_torch(tmp_path):
    folder = saved_folder(tmp_path / "a")
    code = (
        "import sys; from peftkit.registry import Registry; "
        f"e = Registry({str(tmp_path / 'reg')!r}).register('sst2', {str(folder)!r}); "
        "print(e.ref, e.base_fingerprint, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["sst2@1", "fp-task", "False"], out.stderr


def test_register_takes_what_save_pretrained_records(reg, tiny_models, tmp_path):
    from peftkit import build_task_model, load_base, load_preset

    base = load_base(tiny_models["bert"])
    with build_task_model(base, load_preset("lora"), labels=["neg", "pos"]) as model:
        folder = model.save_pretrained(tmp_path / "adapter")
    entry = reg.register("sst2", folder)
    assert (entry.method, entry.labels) == ("lora", ("neg", "pos"))
    assert (entry.base_fingerprint, entry.base) == (base.fingerprint.id, base.fingerprint.to_dict())
    assert reg.load_path("sst2", expected_fingerprint=base.fingerprint.id) == entry


@pytest.mark.skipif(os.name != "posix", reason="symlinks and modes")
def test_linked_folders_are_refused_and_modes_follow_the_umask(reg, src, tmp_path):
    entry = reg.register("sst2", src, **META)
    (tmp_path / "plain").mkdir()
    assert entry.path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # not mkdtemp's 0700
    (src / "linked").symlink_to(tmp_path / "plain")
    with pytest.raises(ConfigError, match="holds symbolic links: linked"):
        reg.register("sst2", src, **META)


def test_names_differing_only_in_case_are_refused(reg, src):
    reg.register("sst2", src, **META)
    with pytest.raises(ConfigError, match="differs only in case"):
        reg.register("SST2", src, **META)
    reg.remove("sst2", all_versions=True)
    assert reg.register("SST2", src, **META).ref == "SST2@2"  # the counter carries on


def test_corrupt_index_is_a_registry_error(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "index.sqlite").write_bytes(b"not a database" * 100)
    reg = Registry(tmp_path / "r")  # opens, so that doctor() and rebuild_index() can run
    with pytest.raises(RegistryError, match=r"index .*index.sqlite is damaged .* rebuild"):
        reg.list()


# -- integrity and fingerprints -------------------------------------------------------------


def test_tampered_file_is_refused_and_the_registry_stays_usable(reg, src, tmp_path):
    bad = reg.register("sst2", src, **META)
    good = reg.register("trec", make_adapter(tmp_path / "trec", seed=2), **META)
    weights = bad.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as err:
        reg.load_path("sst2")
    text = str(err.value)
    assert "adapter_model.safetensors" in text and "sst2@1" in text
    assert bad.files["adapter_model.safetensors"] in text and _sha(weights) in text
    with pytest.raises(IntegrityError):
        reg.export("sst2", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # everything else still works
    assert [e.ref for e in reg.list()] == ["sst2@1", "trec@1"]
    assert reg.load_path("trec") == good
    assert reg.load_path("sst2", verify=False) == bad
    assert reg.register("sst2", src, **META).version == 2
    reg.remove("sst2@1")
    assert [e.ref for e in reg.list()] == ["sst2@2", "trec@1"]


def test_missing_and_extra_files_are_refused(reg, src):
    entry = reg.register("sst2", src, **META)
    (entry.path / "head.safetensors").unlink()
    (entry.path / "notes.txt").write_text("hi")
    with pytest.raises(IntegrityError) as err:
        reg.verify("sst2@1")
    assert "'head.safetensors' is missing" in str(err.value)
    assert "'notes.txt' is not in the index" in str(err.value)
    (entry.path / "adapter_config.json").unlink()
    (entry.path / "adapter_config.json").mkdir()
    with pytest.raises(IntegrityError, match="'adapter_config.json' is missing"):
        reg.load_path("sst2")


def test_fingerprint_mismatch_names_both_bases(reg, src):
    base = {"architecture": "bert:BertModel", "source": "minilm", "quantization": None}
    reg.register("sst2", src, **{**META, "base_fingerprint": "aaa111"}, base=base)
    with pytest.raises(FingerprintMismatch) as err:
        reg.load_path(
            "sst2",
            expected_fingerprint="bbb222",
            expected_base={"architecture": "llama:LlamaForCausalLM"},
        )
    text = str(err.value)
    assert "'aaa111'" in text and "'bbb222'" in text and "minilm" in text
    assert "LlamaForCausalLM" in text
    assert reg.load_path("sst2", expected_fingerprint="aaa111").ref == "sst2@1"


def test_set_metrics_merges_or_replaces_and_persists(reg, src):
    reg.register("sst2", src, **META, metrics={"val_accuracy": 0.8})
    assert reg.set_metrics("sst2", {"test_accuracy": 0.7}).metrics == {
        "val_accuracy": 0.8,
        "test_accuracy": 0.7,
    }
    assert Registry(reg.root).get("sst2@1").metrics["test_accuracy"] == 0.7
    assert reg.set_metrics("sst2@1", {"f1": 0.6}, replace=True).metrics == {"f1": 0.6}
    assert reg.get("sst2").metrics == {"f1": 0.6}


def test_load_path_with_hash_check_time_for_1mb_adapter(reg, tmp_path):
    entry = reg.register("big", make_adapter(tmp_path / "big", size=1 << 20), **META)
    assert sum((entry.path / f).stat().st_size for f in entry.files) > 1 << 20
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        got = reg.load_path("big", expected_fingerprint="fp-a")
        times.append(time.perf_counter() - t0)
    assert got == entry
    print(
        f"\nload_path(verify=True), 1 MB adapter: median {statistics.median(times) * 1e3:.2f} ms,"
        f" max {max(times) * 1e3:.2f} ms over {len(times)} runs"
    )


# -- interrupted registrations --------------------------------------------------------------


@pytest.mark.parametrize("where", ["fill_stage", "move_into_place"])
def test_registration_failing_half_way_leaves_nothing(reg, src, monkeypatch, where):
    original = getattr(staging_mod, where)

    def fail_after(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(staging_mod, where, fail_after)
    with pytest.raises(KeyboardInterrupt):
        reg.register("sst2", src, **META)
    assert reg.list() == [] and _leftovers(reg) == ([], [])
    monkeypatch.undo()
    assert reg.register("sst2", src, **META).version == 1


def _spawn(*args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and flock are POSIX")
@pytest.mark.parametrize("mode", ["hang-after-stage", "hang-after-rename"])
def test_registration_killed_half_way_leaves_no_entry(reg, src, mode):
    proc = _spawn(mode, str(reg.root), "sst2", str(src))
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        assert line.strip() == "HANGING", proc.stderr.read() if proc.poll() is not None else line
        stages, versions = _leftovers(reg)
        if mode == "hang-after-stage":
            assert len(stages) == 1 and versions == []
            Registry(reg.root)  # opening meanwhile must not remove a live registration
            assert len(_leftovers(reg)[0]) == 1
        else:
            assert stages == [] and versions == [os.path.join("adapters", "sst2", "1")]
        assert reg.list() == []  # in progress: nothing visible
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()
    assert reg.list() == []
    fresh = Registry(reg.root)  # the next open cleans up
    assert _leftovers(fresh) == ([], [])
    entry = fresh.register("sst2", src, **META)
    assert entry.version == 1 and fresh.verify(entry) == entry


# -- concurrency --------------------------------------------------------------------------


def test_two_processes_register_50_each_without_losing_any(reg, src, tmp_path):
    go = tmp_path / "go"
    procs = [_spawn("register", str(reg.root), "shared", str(src), "50", str(go)) for _ in range(2)]
    go.touch()
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append([int(v) for v in out.split()])
    entries = reg.list("shared")
    assert len(entries) == 100
    assert [e.version for e in entries] == list(range(1, 101))
    assert sorted(outputs[0] + outputs[1]) == list(range(1, 101))
    assert {len(reg.list(tag=f"pid-{p.pid}")) for p in procs} == {50}
    for e in entries:
        reg.verify(e)
    assert _leftovers(reg)[0] == []


def test_threads_share_one_registry(reg, src):
    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(10):
                reg.register("threaded", src, **META)
                reg.get("threaded")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [e.version for e in reg.list("threaded")] == list(range(1, 41))


# -- exchange with plain peft -------------------------------------------------------------


def _tiny_bert():
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory):
    """A LoRA on a tiny BERT saved by save_pretrained (+ a head), and its outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    model = get_peft_model(
        _tiny_bert(),
        LoraConfig(r=4, target_modules=["query", "value"], task_type="FEATURE_EXTRACTION"),
    )
    with torch.no_grad():  # lora_B starts at zero: make the adapter change the outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(folder)
    save_file({"weight": torch.randn(2, 32)}, str(folder / "head.safetensors"))
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    return folder, ids, expected


def _load_with_plain_peft(folder: Path, ids):
    import torch
    from peft import PeftModel

    model = PeftModel.from_pretrained(_tiny_bert(), str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def test_export_loads_with_plain_peft(reg, peft_folder, tmp_path):
    import torch

    folder, ids, expected = peft_folder
    reg.register("sst2", folder, **META, metrics={"accuracy": 0.9})
    dest = reg.export("sst2", tmp_path / "export")
    assert {p.name for p in dest.iterdir()} == {p.name for p in folder.iterdir()} | {"peftkit.json"}
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors"} <= {
        p.name for p in dest.iterdir()
    }
    meta = json.loads((dest / "peftkit.json").read_text())
    assert meta["ref"] == "sst2@1" and meta["labels"] == ["neg", "pos"]
    assert meta["metrics"] == {"accuracy": 0.9} and "path" not in meta
    out = _load_with_plain_peft(dest, ids)
    torch.testing.assert_close(out, expected)
    with torch.no_grad():
        plain = _tiny_bert()(input_ids=ids).last_hidden_state
    assert not torch.allclose(out, plain, atol=1e-3)  # the adapter was really applied
    with pytest.raises(RegistryError, match="not an empty folder"):
        reg.export("sst2", dest)
    (tmp_path / "empty").mkdir()
    assert reg.export("sst2@1", tmp_path / "empty") == tmp_path / "empty"


def test_export_needs_peft_files(reg, tmp_path):
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "head.safetensors").write_bytes(b"x" * 64)
    reg.register("probe", tmp_path / "probe", **{**META, "method": "probe"})
    with pytest.raises(RegistryError, match="has no adapter_config.json"):
        reg.export("probe", tmp_path / "out")


def test_import_plain_peft_folder_and_round_trip(reg, peft_folder, tmp_path):
    import torch

    folder, ids, expected = peft_folder
    with pytest.raises(ConfigError, match="labels, base_fingerprint"):
        reg.import_folder(folder, "plain")
    entry = reg.import_folder(folder, "plain", labels=["neg", "pos"], base_fingerprint="fp-a")
    assert entry.method == "lora" and set(entry.files) >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    torch.testing.assert_close(_load_with_plain_peft(entry.path, ids), expected)
    # an export carries its metadata back in, under the same name unless told otherwise
    reg.set_metrics("plain", {"accuracy": 0.75})
    dest = reg.export("plain", tmp_path / "export")
    back = reg.import_folder(dest)
    assert back.ref == "plain@2" and "peftkit.json" not in back.files
    assert (back.labels, back.metrics, back.files) == (
        entry.labels,
        {"accuracy": 0.75},
        entry.files,
    )
    assert reg.import_folder(dest, "copy", tags=["imported"]).tags == ("imported",)
    # an export whose files changed on the way is refused
    with open(dest / "adapter_model.safetensors", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        reg.import_folder(dest, "tampered")
    assert reg.names() == ["copy", "plain"] and _leftovers(reg)[0] == []

    # a folder registered with a stale peftkit.json of its own still round-trips
    src = tmp_path / "with-meta"
    src.mkdir()
    for f in folder.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "peftkit.json").write_text('{"labels": ["stale"]}')
    reg.register("own", src, **META)
    again = reg.import_folder(reg.export("own", tmp_path / "own-export"), "own")
    assert again.labels == META["labels"] and "peftkit.json" not in again.files
    with pytest.raises(ConfigError, match="not a peft adapter folder"):
        reg.import_folder(tmp_path, "nothing", labels=["a"], base_fingerprint="x")
