"""Hot-swap, registry loads and mixed-adapter batches on MiniLM vs plain peft (issue 3).

    .venv/bin/python bench/bench_swap.py            # full run -> bench/results/bench_swap.json
    .venv/bin/python bench/bench_swap.py --quick    # smoke run (few steps, few repeats)
    .venv/bin/python bench/bench_swap.py --preset lora-all-linear --out bench_swap_all_linear

Four rank-8 LoRA adapters (``--preset``: ``lora``, q/v; ``lora-all-linear``, every linear
layer), each with its own head and label set (SST-2: 2 labels, AG News:
4, TREC: 6, Banking77: 77), are trained for a few steps with ``peftkit.training.train`` on the first
rows of each corpus in /work/shared/data and registered in a temporary registry. Then:

1. switching between resident adapters: ``AdaptedModel.use()`` vs peft ``set_adapter``
   (a ``PeftModel`` holding the same four adapters, on its own copy of the base);
2. loading an adapter into a live model: ``AdaptedModel.load`` (registry lookup, sha256 of
   the files, fingerprint check, peft load, head) vs peft ``load_adapter`` vs loading
   base + adapter from scratch;
3. a mixed batch of 32 rows over the four adapters (``predict_mixed``) vs a single-adapter
   batch of 32 (``predict``), vs the naive plain-peft route (four batches, set_adapter
   before each); each mixed row is checked against the same adapter alone;
4. peft's ``hotswap_adapter`` on adapters that carry classifier heads: what happens.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, environment, table, write_results  # noqa: E402

TASKS = [("sst2", "sst2"), ("agnews", "ag_news"), ("trec", "trec"), ("banking77", "banking77")]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def timings(values_s: list[float]) -> dict:
    us = [v * 1e6 for v in values_s]
    return {
        "n": len(us),
        "p50_us": pct(us, 50),
        "p99_us": pct(us, 99),
        "mean_us": float(np.mean(us)),
    }


# -- setup --------------------------------------------------------------------------------


def make_adapters(base, registry, work: Path, steps: int, preset: str = "lora") -> dict:
    """Train a few LoRA steps per task with peftkit.training.train; register each adapter."""
    from peftkit.adapters.folder import release, save_adapter
    from peftkit.config.presets import load_preset
    from peftkit.data.load import load_data
    from peftkit.training.train import TrainConfig, train

    spec = load_preset(preset)
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=16,
        max_length=64,
        eval_batch_size=64,
        checkpoint_every=10_000,
        progress=False,
        patience=None,
    )
    out = {}
    for name, folder in TASKS:
        data = load_data(DATA / folder, max_rows=256)
        t0 = time.perf_counter()
        res = train(base, spec, data, cfg, work / "runs" / name)
        adapter = save_adapter(
            res.model,
            work / "runs" / name / "adapter",
            method=spec.method,
            labels=data.labels,
            max_length=cfg.max_length,
        )
        release(res.model)
        entry = registry.register(
            name,
            adapter,
            method=spec.method,
            labels=data.labels,
            base_fingerprint=base.fingerprint.id,
            base=base.fingerprint.to_dict(),
            metrics=res.test_metrics,
        )
        out[name] = {
            "labels": len(data.labels),
            "steps": res.steps,
            "train_seconds": time.perf_counter() - t0,
            "test_accuracy_256_rows": res.test_metrics.get("accuracy"),
            "ref": entry.ref,
            "trainable": res.trainable,
            "folder": str(entry.path),
        }
    return out


def plain_peft(folders: dict[str, str]):
    """A plain peft model (own base copy) with the four adapters and their heads."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from peftkit.models.assets import PACKAGED_MODELS, package_folder

    path = package_folder(PACKAGED_MODELS["minilm"])
    body = AutoModel.from_pretrained(path).eval()
    names = list(folders)
    model = PeftModel.from_pretrained(body, folders[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(folders[n], adapter_name=n)
    model.eval()
    heads = {}
    for n, f in folders.items():
        st = load_file(str(Path(f) / "head.safetensors"))
        lin = torch.nn.Linear(st["weight"].shape[1], st["weight"].shape[0])
        lin.load_state_dict(st)
        heads[n] = lin.eval()
    return model, heads, AutoTokenizer.from_pretrained(path), path


def peft_mixed_probs(model, heads, tok, texts: list[str], refs: list[str]) -> list[np.ndarray]:
    """Plain peft's own mixed batch: one forward with ``adapter_names=``, then each row's
    head (peft itself can only apply one shared head)."""
    import torch

    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc, adapter_names=refs).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return [torch.softmax(heads[r](pooled[i]), -1).numpy() for i, r in enumerate(refs)]


def peft_probs(model, heads, tok, texts: list[str], name: str) -> np.ndarray:
    """Naive plain-peft prediction for one adapter: set_adapter, forward, mean pool, head."""
    import torch

    model.set_adapter(name)
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.softmax(heads[name](pooled), -1).numpy()


# -- measurements -------------------------------------------------------------------------


def bench_switch(am, peft_model, names: list[str], n_use: int, n_set: int) -> dict:
    for n in names:
        am.use(n)
    use_t = []
    for i in range(n_use):
        ref = names[i % len(names)]
        t0 = time.perf_counter()
        am.use(ref)
        use_t.append(time.perf_counter() - t0)
    set_t = []
    for i in range(n_set):
        ref = names[i % len(names)]
        t0 = time.perf_counter()
        peft_model.set_adapter(ref)
        set_t.append(time.perf_counter() - t0)
    use_cpu, set_cpu = [], []  # thread CPU time: what the call costs without preemption
    for i in range(n_use):
        ref = names[i % len(names)]
        c0 = time.thread_time()
        am.use(ref)
        use_cpu.append(time.thread_time() - c0)
    for i in range(n_set):
        ref = names[i % len(names)]
        c0 = time.thread_time()
        peft_model.set_adapter(ref)
        set_cpu.append(time.thread_time() - c0)
    use, setp = timings(use_t), timings(set_t)
    return {
        "peftkit_use": use,
        "peft_set_adapter": setp,
        "peftkit_use_cpu_time": timings(use_cpu),
        "peft_set_adapter_cpu_time": timings(set_cpu),
        "speedup_p50": setp["p50_us"] / use["p50_us"],
        "speedup_p99": setp["p99_us"] / use["p99_us"],
        "goal_p50_us": 50.0,
        "goal_met": use["p50_us"] <= 50.0,
    }


def bench_load(am, peft_model, folders: dict, names: list[str], repeats: int, scratch: int) -> dict:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from peftkit.models.base import load_base

    target = names[0]
    cpu: dict[str, list[float]] = {"peftkit": [], "peft": []}
    am_t = []
    for _ in range(repeats):
        am.evict(target)
        t0, c0 = time.perf_counter(), time.process_time()
        am.load(target)
        am_t.append(time.perf_counter() - t0)
        cpu["peftkit"].append(time.process_time() - c0)
    am_unverified = []
    verify = am.verify
    am.verify = False
    for _ in range(repeats):
        am.evict(target)
        t0 = time.perf_counter()
        am.load(target)
        am_unverified.append(time.perf_counter() - t0)
    am.verify = verify
    peft_t = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        peft_model.load_adapter(folders[target], adapter_name="fresh")
        peft_t.append(time.perf_counter() - t0)
        cpu["peft"].append(time.process_time() - c0)
        peft_model.delete_adapter("fresh")
    scratch_t = []
    for _ in range(scratch):
        t0 = time.perf_counter()
        b = load_base("minilm")
        m = PeftModel.from_pretrained(b.model, folders[target], adapter_name=target)
        st = load_file(str(Path(folders[target]) / "head.safetensors"))
        lin = torch.nn.Linear(st["weight"].shape[1], st["weight"].shape[0])
        lin.load_state_dict(st)
        scratch_t.append(time.perf_counter() - t0)
        del m, b
    ms = lambda v: {  # noqa: E731
        "n": len(v),
        "p50_ms": pct(v, 50) * 1e3,
        "p99_ms": pct(v, 99) * 1e3,
        "min_ms": min(v) * 1e3,
    }
    a, p, s = ms(am_t), ms(peft_t), ms(scratch_t)
    return {
        "adapter": target,
        "peftkit_load_verified": a,
        "peftkit_load_no_hash_check": ms(am_unverified),
        "peft_load_adapter": p,
        "scratch_load_base_plus_adapter": s,
        "peftkit_load_verified_cpu_time": ms(cpu["peftkit"]),
        "peft_load_adapter_cpu_time": ms(cpu["peft"]),
        "ratio_peftkit_over_peft_p50": a["p50_ms"] / p["p50_ms"],
        "speedup_vs_scratch_p50": s["p50_ms"] / a["p50_ms"],
        "goal_ms": 20.0,
        "goal_met": a["p50_ms"] <= 20.0,
        "note": "peft load_adapter loads the LoRA weights only (no head, no hash or base "
        "check); peftkit load includes registry lookup, sha256 of files, fingerprint check, "
        "peft load_adapter and the head",
    }


def test_texts() -> tuple[list[str], list[str]]:
    from peftkit.data.load import load_data

    texts, refs = [], []
    per_task = {n: load_data(DATA / f, max_rows=64).split("test").texts for n, f in TASKS}
    for i in range(8):
        for n, _ in TASKS:
            texts.append(per_task[n][i])
            refs.append(n)
    return texts, refs


def bench_mixed(am, peft_model, heads, tok, names: list[str], repeats: int) -> dict:
    texts, refs = test_texts()
    single_ref = names[0]
    for _ in range(3):  # warm-up
        am.predict_mixed(texts, refs)
        am.predict(texts, adapter=single_ref)
    mixed_t, single_t, naive_t, naive_kit_t = [], [], [], []
    mixed_c, single_c = [], []
    peft_single_t, peft_mixed_t = [], []
    groups = {n: [t for t, r in zip(texts, refs, strict=True) if r == n] for n in names}
    for _ in range(repeats):  # interleaved, so load from other processes hits all alike
        t0, c0 = time.perf_counter(), time.process_time()
        am.predict_mixed(texts, refs)
        mixed_t.append(time.perf_counter() - t0)
        mixed_c.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        am.predict(texts, adapter=single_ref)
        single_t.append(time.perf_counter() - t0)
        single_c.append(time.process_time() - c0)
        t0 = time.perf_counter()
        for n in names:
            peft_probs(peft_model, heads, tok, groups[n], n)
        naive_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for n in names:
            am.predict(groups[n], adapter=n)
        naive_kit_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        peft_probs(peft_model, heads, tok, texts, single_ref)
        peft_single_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        peft_mixed_probs(peft_model, heads, tok, texts, refs)
        peft_mixed_t.append(time.perf_counter() - t0)
    # correctness: each mixed row vs the same adapter alone
    mixed = am.predict_mixed(texts, refs)
    diff_batch, diff_alone, diff_peft, label_mismatch = 0.0, 0.0, 0.0, 0
    for n in names:
        full_batch = am.predict_proba(texts, adapter=n)
        peft_full = peft_probs(peft_model, heads, tok, texts, n)
        diff_peft = max(diff_peft, float(np.abs(full_batch - peft_full).max()))
        for i, r in enumerate(refs):
            if r != n:
                continue
            got = np.array(list(mixed[i].probs.values()))
            alone = am.predict_proba([texts[i]], adapter=n)[0]
            diff_batch = max(diff_batch, float(np.abs(got - full_batch[i]).max()))
            diff_alone = max(diff_alone, float(np.abs(got - alone).max()))
            label_mismatch += int(mixed[i].label != am.predict([texts[i]], adapter=n)[0].label)
    med = lambda v: float(np.median(v)) * 1e3  # noqa: E731
    m, s, nv, nk = med(mixed_t), med(single_t), med(naive_t), med(naive_kit_t)
    return {
        "rows": len(texts),
        "adapters": {n: len(heads[n].weight) for n in names},
        "single_adapter": single_ref,
        "peftkit_mixed_ms_p50": m,
        "peftkit_single_ms_p50": s,
        "peft_naive_4_batches_ms_p50": nv,
        "peftkit_4_separate_predicts_ms_p50": nk,
        "peftkit_mixed_cpu_ms_p50": med(mixed_c),
        "peftkit_single_cpu_ms_p50": med(single_c),
        "plain_peft_single_adapter_ms_p50": med(peft_single_t),
        "plain_peft_adapter_names_mixed_ms_p50": med(peft_mixed_t),
        "throughput_ratio_mixed_vs_single": s / m,
        "throughput_ratio_mixed_vs_plain_peft_single": med(peft_single_t) / m,
        "throughput_ratio_plain_peft_mixed_vs_plain_peft_single": med(peft_single_t)
        / med(peft_mixed_t),
        "throughput_ratio_mixed_vs_single_cpu_time": med(single_c) / med(mixed_c),
        "speedup_mixed_vs_peft_naive": nv / m,
        "goal_ratio": 0.95,
        "goal_met": s / m >= 0.95,
        "max_abs_diff_mixed_vs_same_batch_single_adapter": diff_batch,
        "max_abs_diff_mixed_vs_row_alone": diff_alone,
        "max_abs_diff_peftkit_vs_plain_peft_same_adapter": diff_peft,
        "label_mismatches_mixed_vs_alone": label_mismatch,
        "repeats": repeats,
    }


def bench_hotswap(folders: dict, work: Path) -> dict:
    """peft's hotswap_adapter, (a) on SEQ_CLS adapters whose classifier lives in the peft
    model, (b) on peftkit's feature-extraction folders (heads kept outside peft)."""
    import torch
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model
    from peft.utils.hotswap import hotswap_adapter
    from transformers import AutoModel, AutoModelForSequenceClassification

    from peftkit.models.assets import PACKAGED_MODELS, package_folder

    path = package_folder(PACKAGED_MODELS["minilm"])
    out: dict = {}

    def seqcls(num_labels: int, seed: int) -> str:
        torch.manual_seed(seed)
        m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        cfg = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=8,
            lora_alpha=16,
            target_modules=["query", "value"],
            init_lora_weights=False,
        )
        pm = get_peft_model(m, cfg)
        d = work / f"seqcls-{num_labels}-{seed}"
        pm.save_pretrained(d)
        return str(d)

    def attempt(label: str, make_model, other: str) -> None:
        try:
            model = make_model()
            t0 = time.perf_counter()
            hotswap_adapter(model, other, adapter_name="default", torch_device="cpu")
            out[label] = {"outcome": "ok", "ms": (time.perf_counter() - t0) * 1e3}
        except Exception as exc:  # recording what happens is the point
            out[label] = {
                "outcome": "error",
                "error": f"{type(exc).__name__}: {exc}"[:300],
                "where": traceback.format_exc().strip().splitlines()[-3][:300],
            }

    a2, b2, c4 = seqcls(2, 1), seqcls(2, 2), seqcls(4, 3)

    def load_seqcls():
        m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        return PeftModel.from_pretrained(m, a2)

    attempt("seq_cls_head_in_peft_same_label_count_2_to_2", load_seqcls, b2)
    attempt("seq_cls_head_in_peft_2_to_4_labels", load_seqcls, c4)
    names = list(folders)

    def load_fe():
        return PeftModel.from_pretrained(AutoModel.from_pretrained(path), folders[names[0]])

    attempt(
        "feature_extraction_lora_only_heads_outside_peft",
        load_fe,
        folders[names[1]],
    )
    out["feature_extraction_lora_only_heads_outside_peft"]["note"] = (
        "swaps the LoRA weights only; the head (and its label set) is not part of the peft "
        "folder, so the caller must swap it separately"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--repeats", type=int, default=30, help="mixed-batch and load repeats")
    parser.add_argument(
        "--preset",
        default="lora",
        help="LoRA preset of the four adapters (lora-all-linear: all layers)",
    )
    parser.add_argument("--out", default="bench_swap", help="results name")
    ns = parser.parse_args()
    import torch

    from peftkit.models.base import load_base
    from peftkit.registry.store import Registry
    from peftkit.serving.adapted import AdaptedModel

    torch.manual_seed(0)
    q = ns.quick
    work = Path(tempfile.mkdtemp(prefix="peftkit-bench-swap-"))
    base = load_base("minilm")
    registry = Registry(work / "registry")
    made = make_adapters(base, registry, work, steps=3 if q else 12, preset=ns.preset)
    names = list(made)
    folders = {n: made[n]["folder"] for n in names}
    am = AdaptedModel(base, registry, max_resident=8)
    peft_model, heads, tok, _ = plain_peft(folders)

    results = {
        "benchmark": "bench_swap",
        "issue": 3,
        "environment": environment(),
        "preset": ns.preset,
        "adapters": made,
        "switch": bench_switch(am, peft_model, names, 200 if q else 5000, 50 if q else 500),
        "load": bench_load(am, peft_model, folders, names, 5 if q else ns.repeats, 1 if q else 3),
        "mixed_batch": bench_mixed(am, peft_model, heads, tok, names, 3 if q else ns.repeats),
        "hotswap_adapter": bench_hotswap(folders, work),
    }
    path = write_results(ns.out, results, quick=q)

    sw, ld, mx = results["switch"], results["load"], results["mixed_batch"]
    print(
        table(
            [
                [
                    "use() vs set_adapter",
                    f"{sw['peftkit_use']['p50_us']:.1f} us",
                    f"{sw['peftkit_use']['p99_us']:.1f} us",
                    f"{sw['peft_set_adapter']['p50_us']:.1f} us",
                    f"{sw['peft_set_adapter']['p99_us']:.1f} us",
                    f"{sw['speedup_p50']:.0f}x faster",
                    f"<=50 us p50: {'met' if sw['goal_met'] else 'MISSED'}",
                ],
                [
                    "load (hash checked) vs load_adapter",
                    f"{ld['peftkit_load_verified']['p50_ms']:.1f} ms",
                    f"{ld['peftkit_load_verified']['p99_ms']:.1f} ms",
                    f"{ld['peft_load_adapter']['p50_ms']:.1f} ms",
                    f"{ld['peft_load_adapter']['p99_ms']:.1f} ms",
                    f"{ld['ratio_peftkit_over_peft_p50']:.2f}x peft time",
                    f"<=20 ms: {'met' if ld['goal_met'] else 'MISSED'}",
                ],
                [
                    "load vs base+adapter from scratch",
                    f"{ld['peftkit_load_verified']['p50_ms']:.1f} ms",
                    "",
                    f"{ld['scratch_load_base_plus_adapter']['p50_ms']:.0f} ms",
                    "",
                    f"{ld['speedup_vs_scratch_p50']:.0f}x faster",
                    "",
                ],
                [
                    "mixed 32 rows/4 adapters vs single 32",
                    f"{mx['peftkit_mixed_ms_p50']:.1f} ms",
                    "",
                    f"{mx['peftkit_single_ms_p50']:.1f} ms",
                    "",
                    f"{mx['throughput_ratio_mixed_vs_single']:.3f}x throughput",
                    f">=0.95x: {'met' if mx['goal_met'] else 'MISSED'}",
                ],
                [
                    "mixed vs plain peft single-adapter 32",
                    f"{mx['peftkit_mixed_ms_p50']:.1f} ms",
                    "",
                    f"{mx['plain_peft_single_adapter_ms_p50']:.1f} ms",
                    "",
                    f"{mx['throughput_ratio_mixed_vs_plain_peft_single']:.3f}x throughput",
                    "",
                ],
                [
                    "plain peft adapter_names mixed vs its single",
                    f"{mx['plain_peft_adapter_names_mixed_ms_p50']:.1f} ms",
                    "",
                    f"{mx['plain_peft_single_adapter_ms_p50']:.1f} ms",
                    "",
                    f"{mx['throughput_ratio_plain_peft_mixed_vs_plain_peft_single']:.3f}x",
                    "",
                ],
                [
                    "mixed vs naive peft (4 batches)",
                    f"{mx['peftkit_mixed_ms_p50']:.1f} ms",
                    "",
                    f"{mx['peft_naive_4_batches_ms_p50']:.1f} ms",
                    "",
                    f"{mx['speedup_mixed_vs_peft_naive']:.2f}x faster",
                    "",
                ],
            ],
            ["measure", "peftkit p50", "p99", "anchor p50", "p99", "ratio", "goal"],
        )
    )
    print(
        f"CPU time (no preemption): use() p50 {sw['peftkit_use_cpu_time']['p50_us']:.1f} us vs "
        f"set_adapter {sw['peft_set_adapter_cpu_time']['p50_us']:.1f} us; load "
        f"{ld['peftkit_load_verified_cpu_time']['p50_ms']:.1f} ms vs load_adapter "
        f"{ld['peft_load_adapter_cpu_time']['p50_ms']:.1f} ms; mixed/single throughput "
        f"{mx['throughput_ratio_mixed_vs_single_cpu_time']:.3f}x"
    )
    print(
        f"mixed rows vs same adapter alone: max |dp| {mx['max_abs_diff_mixed_vs_row_alone']:.2e}"
        f" (vs same batch single adapter {mx['max_abs_diff_mixed_vs_same_batch_single_adapter']:.2e};"
        f" peftkit vs plain peft {mx['max_abs_diff_peftkit_vs_plain_peft_same_adapter']:.2e};"
        f" label mismatches {mx['label_mismatches_mixed_vs_alone']})"
    )
    for k, v in results["hotswap_adapter"].items():
        print(f"hotswap_adapter {k}: {v['outcome']} {v.get('error', '')}")
    print(f"results: {path}")
    am.close()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
