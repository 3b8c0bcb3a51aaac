"""Zero-shot scoring vs lm-evaluation-harness, side by side in one process (issue 4).

    .venv/bin/python bench/bench_zeroshot.py           # -> bench/results/bench_zeroshot.json
    .venv/bin/python bench/bench_zeroshot.py --quick   # 40 rows, one batch size each
    .venv/bin/python bench/bench_zeroshot.py --tasks banking77 --out bench_zeroshot_banking \
        --lm-eval-batches 16,32 --peftkit-batches 8,16 --sweep-rows 32   # not in the default

Needs the bench extra (``pip install -e .[bench]``: lm_eval 0.4.13, setfit).

For SST-2 (test = GLUE dev, 872 rows) and AG News (first 1,000 test rows) with the packaged
SmolLM2-135M, the same template and label words on both sides (lm-eval's choices get its
``target_delimiter`` " ", ours carry the space). ``sst2_icl`` is SST-2 again with 2
in-context demonstrations per class (seed 0, from train) before every query: lm-eval gets
them written into its ``doc_to_text``, peftkit gets ``demonstrations=2`` (the same 4 in the
same order, so the same prompt strings: the predictions must all agree), and runs their
tokens once, not once per query. ``ag_news_instruct`` is AG News with the template
``classify-article`` (an instruction, then the article) and the dataset's label names
(" Sci/Tech" three tokens): the instruction starts every prompt, and peftkit runs it once.
It is the shape of lm-eval's own AG News task (``tasks/unitxt/ag_news.yaml``: unitxt's
``templates.classification.multi_class.title``, "Classify the topic of the following sentence
to one of these options: ...", then the text; a generation task there, so not timed here).
``banking77`` is 77 intents whose label words are all several tokens (every 15th test row:
the file is sorted by label): lm-eval runs one forward per (example, label), peftkit one per
example, the labels' words after the prompt as a tree.

- lm-eval: ``simple_evaluate`` on an ``HFLM`` wrapping the very model object we score with,
  a task YAML over the same jsonl file (``output_type: multiple_choice``, metric ``acc`` =
  sum of log-likelihoods); examples/s is rows over the time inside ``HFLM.loglikelihood``
  (its scoring loop, no task building);
- peftkit: ``evaluate_prompts(..., normalize="sum")`` (the shared-prefix scorer), examples/s
  over its scoring time.

Each side runs at its best batch size, picked by a sweep on the first ``--sweep-rows`` rows,
then the timed rows in ``--chunks`` (8) consecutive chunks, the two sides taking turns on
each (lm-eval first on even chunks, peftkit first on odd ones): drift in this shared
machine's speed, which moved whole runs by 10-20% against each other, weighs on both sides
alike. The speedup is total rows over total time per side; each chunk's is kept too.
FLOPs are counted over the timed rows themselves, from the shape of every forward each side
makes (a hook records batch x tokens fed and the positions given logits): 2 x tokens x the
weights of every linear layer, plus 2 x positions x vocabulary x hidden for the LM head, the
same count ``torch.utils.flop_counter.FlopCounterMode`` gives (checked at the start of each
run, ``flop_formula_check``). Padding and full-vocabulary logits are included, attention's
own products are not (as in the counter's count for SDPA; a few percent at these lengths).
Achieved GFLOP/s = FLOPs/example × examples/s, set against a plain fp32 matmul's GFLOP/s (2048²,
``torch.mm``; the median of one measurement at the start and one after each task): how
close to this CPU's limit each scorer runs.

``--dtype bfloat16`` (``--out bench_zeroshot_bf16``) loads the model in bfloat16 for both
sides (what ``base.dtype: bfloat16`` gives a recipe; native on CPUs with AVX512-BF16 / AMX),
sets the GFLOP/s against a bfloat16 matmul, and scores the timed rows once more in float32
(untimed) to report each side's accuracy and prediction agreement against float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, environment, table, write_results  # noqa: E402

TASKS = {
    "sst2": {
        "folder": "sst2",
        "prompts": "sentiment",
        "template": "lm-eval-sst2",
        "rows": None,  # all 872
    },
    "ag_news": {
        "folder": "ag_news",
        "prompts": "news_ag",
        "template": "topic-question",
        "rows": 1000,
    },
    # an instruction before the article (the same words start every prompt: peftkit runs
    # them once) and the dataset's label names, " Sci/Tech" three tokens
    "ag_news_instruct": {
        "folder": "ag_news",
        "prompts": "news_ag",
        "template": "classify-article",
        "rows": 1000,
    },
    # 77 intents, every label several tokens: lm-eval runs one forward per (example, label),
    # peftkit one per example (the labels as a tree after the prompt). The test file is
    # sorted by label: every 15th row, so 75 of the 77 intents are among the 200 timed. Slow for
    # lm-eval (2.5 s per example): only when named in --tasks
    "banking77": {
        "folder": "banking77",
        "prompts": "intent_banking",
        "template": "customer-intent",
        "rows": 200,
        "stride": 15,
        "slow": True,
    },
    # in-context: 2 demonstrations per class (seed 0, from train) before every query, the
    # same 4 on both sides; peftkit runs their tokens once (shared by every prompt)
    "sst2_icl": {
        "folder": "sst2",
        "prompts": "sentiment",
        "template": "lm-eval-sst2",
        "rows": None,
        "demos": 2,
    },
}


def demo_block(spec: dict, data, prompt) -> str:
    """The task's in-context demonstrations as peftkit writes them before each query."""
    from peftkit.prompting.demonstrations import sample_demos

    if not spec.get("demos"):
        return ""
    train = data.split("train")
    demos = sample_demos(train.texts, train.labels, spec["demos"], seed=0, label_names=data.labels)
    return "".join(
        prompt.template.render(d.row()) + prompt.verbalizer.answer(d.label) + "\n\n" for d in demos
    )


def matmul_gflops(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    import torch

    a, b = (torch.randn(n, n, dtype=getattr(torch, dtype)) for _ in range(2))
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def task_yaml(name: str, path: Path, prompt, labels: tuple[str, ...], prefix: str = "") -> str:
    """An lm-eval task over ``path`` with our template (after ``prefix``: demonstrations);
    choices without their leading space."""
    if "{{" in prefix or "{%" in prefix:
        raise SystemExit(f"{name}: the demonstrations hold Jinja markup lm-eval would expand")
    phrases = [prompt.verbalizer.phrases(lab) for lab in labels]
    if any(len(p) != 1 or not p[0].startswith(" ") for p in phrases):
        raise SystemExit(f"{prompt.name}: lm-eval needs one space-led phrase per label")
    choices = [p[0][1:] for p in phrases]
    text = prefix + prompt.template.text.replace("{text}", "{{text}}")
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(path))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        f"doc_to_text: {json.dumps(text)}\n"
        f"doc_to_choice: {json.dumps(choices)}\n"
        f"doc_to_target: '{{{{ {json.dumps(list(labels))}.index(label) }}}}'\n"
        "target_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n"
    )


class LmEval:
    """lm-eval's HFLM over our model object; times its loglikelihood loop."""

    def __init__(self, base, task_dir: Path):
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        self.lm = HFLM(pretrained=base.model, tokenizer=base.tokenizer, batch_size=1)
        self.tm = TaskManager(include_path=str(task_dir))
        self.score_seconds = 0.0
        inner = self.lm.loglikelihood

        def timed(requests, *a, **k):
            t0 = time.perf_counter()
            try:
                return inner(requests, *a, **k)
            finally:
                self.score_seconds += time.perf_counter() - t0

        self.lm.loglikelihood = timed

    def run(self, task: str, rows: int, batch: int) -> dict:
        from lm_eval import simple_evaluate

        self.lm.batch_size_per_gpu = batch
        self.score_seconds = 0.0
        out = simple_evaluate(
            model=self.lm,
            tasks=[task],
            task_manager=self.tm,
            limit=rows,
            log_samples=True,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        preds = [max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) for s in samples]
        return {
            "accuracy": out["results"][task]["acc,none"],
            "preds": preds,
            "seconds": self.score_seconds,
            "examples_per_s": len(samples) / self.score_seconds,
        }


def ours(base, data, prompts, template, rows: int, batch: int, demos: int = 0) -> dict:
    from peftkit.prompting.evaluation import evaluate_prompts

    run = evaluate_prompts(
        base, data, prompts, templates=[template], max_rows=rows, sample="first", batch_size=batch,
        demonstrations=demos, demo_pool=data.split("train") if demos else None,
    )  # fmt: skip
    r = run.results[0]
    return {
        "probs": r.probs,
        "gold": list(data.split("test").labels[:rows]),
        "accuracy": r.accuracy,
        "macro_f1": r.macro_f1,
        "ece": r.ece,
        "preds": r.probs.argmax(1).tolist(),
        "seconds": r.seconds,
        "examples_per_s": r.examples_per_s,
        "truncated": r.truncated,
    }


def task_data(spec: dict, tmp: Path):
    """The task's dataset and its test rows' jsonl file (every ``stride``-th row when the
    task has one, written to ``tmp``: both sides then read its first rows)."""
    from peftkit.data.load import TextDataset, load_data

    data = load_data(DATA / spec["folder"])
    source = DATA / spec["folder"] / "test.jsonl"
    if not spec.get("stride"):
        return data, source
    picked = range(0, len(data.split("test")), spec["stride"])
    lines = source.read_text().splitlines()
    source = tmp / f"{spec['folder']}-every-{spec['stride']}.jsonl"
    source.write_text("\n".join(lines[i] for i in picked) + "\n")
    splits = {name: data.split(name) for name in ("train",) if spec.get("demos")}
    splits["test"] = data.split("test").subset(picked)
    return TextDataset(data.name, data.labels, splits), source


def n_rows(spec: dict, data, quick: bool) -> int:
    """How many test rows a task times."""
    if quick:
        return 40
    return len(data.split("test")) if spec["rows"] is None else spec["rows"]


def chunks(n: int, k: int) -> list[tuple[int, int]]:
    """``k`` consecutive (start, end) ranges covering ``range(n)``, sizes within one."""
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


DTYPE_TAG = {"float32": "fp32", "bfloat16": "bf16"}


def _agree(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


class FlopLog:
    """Matmul FLOPs of every forward of ``model`` while active, from the shapes alone (a
    forward hook: no cost to the timing): 2 x rows x tokens x the linear layers' weights,
    plus 2 x the logits' rows x positions x the LM head's weights."""

    def __init__(self, model):
        import torch

        head = model.get_output_embeddings()
        self.linear = sum(
            m.weight.numel()
            for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m is not head
        )
        self.head = head.weight.numel()
        self.model, self.flops = model, 0

    def _hook(self, _module, args, kwargs, output) -> None:
        ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
        rows, tokens = ids.shape
        # the logits' own rows: peftkit's packed forwards give (1, kept positions, vocabulary)
        logits = output.logits.shape[0] * output.logits.shape[1]
        self.flops += 2 * (rows * tokens * self.linear + logits * self.head)

    def __enter__(self) -> FlopLog:
        self._handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def flop_formula_check(base) -> float:
    """FlopLog's count over FlopCounterMode's: two plain forwards (all logits; three kept)
    and peftkit's packed scoring of prompts of several lengths sharing an instruction, with
    a three-token label (its tree rides after each prompt; the head runs at kept positions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from peftkit.prompting.scorers import continuation_logprobs

    model = base.model
    ids = torch.randint(100, 1000, (3, 40))
    lead = "Classify the news article as World, Sports, Business, or Sci/Tech.\n\nArticle: "
    prompts = [lead + " ".join(["word"] * n) + "\nTopic:" for n in (3, 30, 7, 12, 60)]
    counter = FlopCounterMode(display=False)
    with FlopLog(model) as log, counter, torch.inference_mode():
        model(ids)
        model(input_ids=ids, logits_to_keep=torch.arange(-3, 0))
        continuation_logprobs(model, base.tokenizer, prompts, [" World", " Sci/Tech"], batch_size=4)
    return log.flops / counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--tasks", default=",".join(k for k, v in TASKS.items() if not v.get("slow"))
    )
    parser.add_argument("--out", default="bench_zeroshot", help="results file name")
    parser.add_argument("--sweep-rows", type=int, default=96)
    parser.add_argument("--lm-eval-batches", default="4,8,16,32")
    parser.add_argument("--peftkit-batches", default="4,8,16,32,64")
    parser.add_argument("--chunks", type=int, default=8, help="timed row chunks, sides alternating")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"),
        help="the model's weights for both sides; bfloat16 also scores the rows in float32 "
        "(untimed) to report agreement with it",
    )  # fmt: skip
    ns = parser.parse_args()
    import torch

    from peftkit.data.load import TextDataset
    from peftkit.metrics.report import probability_metrics
    from peftkit.models.base import load_base
    from peftkit.prompting.templates import load_prompt_set

    env = environment()
    peaks = [matmul_gflops(dtype=ns.dtype)]  # again after each task's timed rows; median kept
    print(f"{ns.dtype} matmul 2048²: {peaks[0]:.1f} GFLOP/s ({torch.get_num_threads()} threads)",
          flush=True)  # fmt: skip
    base = load_base("smollm2-135m", dtype=ns.dtype)
    reference = None if ns.dtype == "float32" else load_base("smollm2-135m")
    formula_check = flop_formula_check(base)
    print(f"FLOPs from shapes / FlopCounterMode's: {formula_check:.4f}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="peftkit-lmeval-"))
    lm_b = [int(b) for b in ns.lm_eval_batches.split(",")]
    our_b = [int(b) for b in ns.peftkit_batches.split(",")]
    if ns.quick:
        lm_b, our_b = lm_b[1:2] or lm_b, our_b[1:2] or our_b  # the second size, if given
    results = []
    specs = {k: TASKS[k] for k in ns.tasks.split(",")}
    datasets = {}
    for key, spec in specs.items():
        data, source = task_data(spec, tmp)
        datasets[key] = data  # the timed loop below reads the same rows
        prompts = load_prompt_set(spec["prompts"])
        prompt = prompts.get(spec["template"])
        prefix = demo_block(spec, data, prompt)
        (tmp / f"{key}.yaml").write_text(
            task_yaml(f"peftkit_{key}", source, prompt, data.labels, prefix)
        )
        lines = source.read_text().splitlines()
        for c, (a, b) in enumerate(chunks(n_rows(spec, data, ns.quick), ns.chunks)):
            part = tmp / f"{key}-{c}.jsonl"  # chunk c of the timed rows, for lm-eval
            part.write_text("\n".join(lines[a:b]) + "\n")
            (tmp / f"{key}-{c}.yaml").write_text(
                task_yaml(f"peftkit_{key}_{c}", part, prompt, data.labels, prefix)
            )
    harness = LmEval(base, tmp)
    for key, spec in specs.items():
        data = datasets[key]
        n = n_rows(spec, data, ns.quick)
        sweep_n = min(ns.sweep_rows, n)
        task = f"peftkit_{key}"

        def lm_run(rows, b, task=task):
            return harness.run(task, rows, b)

        def our_run(rows, b, data=data, spec=spec):
            return ours(
                base, data, spec["prompts"], spec["template"], rows, b, spec.get("demos", 0)
            )

        sweep = {"lm_eval": {}, "peftkit": {}}
        for b in lm_b:
            sweep["lm_eval"][b] = lm_run(sweep_n, b)["examples_per_s"]
            print(f"[{key}] lm-eval batch {b}: {sweep['lm_eval'][b]:.2f} ex/s", flush=True)
        for b in our_b:
            sweep["peftkit"][b] = our_run(sweep_n, b)["examples_per_s"]
            print(f"[{key}] peftkit batch {b}: {sweep['peftkit'][b]:.2f} ex/s", flush=True)
        best_lm = max(sweep["lm_eval"], key=sweep["lm_eval"].get)
        best_our = max(sweep["peftkit"], key=sweep["peftkit"].get)
        # the timed rows in chunks, the two sides taking turns (A B, B A, ...): a machine
        # that speeds up or slows down during the run weighs on both sides alike
        test = data.split("test")
        timed: dict[str, list[dict]] = {"lm_eval": [], "peftkit": []}
        flops = {side: FlopLog(base.model) for side in timed}
        for c, (a, b) in enumerate(chunks(n, ns.chunks)):
            splits = {"test": test.subset(range(a, b))}
            if spec.get("demos"):  # the demonstrations' pool
                splits["train"] = data.split("train")
            part = TextDataset(data.name, data.labels, splits)
            sides = [("lm_eval", best_lm), ("peftkit", best_our)]
            for side, bs in sides if c % 2 == 0 else sides[::-1]:
                with flops[side]:
                    if side == "lm_eval":
                        res = harness.run(f"{task}_{c}", b - a, bs)
                    else:
                        res = ours(
                            base, part, spec["prompts"], spec["template"], b - a, bs,
                            spec.get("demos", 0),
                        )  # fmt: skip
                timed[side].append(res)
            ratio = timed["peftkit"][-1]["examples_per_s"] / timed["lm_eval"][-1]["examples_per_s"]
            print(f"[{key}] chunk {c + 1}/{ns.chunks} rows {a}-{b}: speedup {ratio:.2f}x",
                  flush=True)  # fmt: skip
        peaks.append(matmul_gflops(dtype=ns.dtype))
        lm, us = ({} for _ in range(2))
        for side, res in (("lm_eval", lm), ("peftkit", us)):
            parts = timed[side]
            res["seconds"] = sum(t["seconds"] for t in parts)
            res["examples_per_s"] = n / res["seconds"]
            res["chunk_examples_per_s"] = [t["examples_per_s"] for t in parts]
            res["preds"] = [p for t in parts for p in t["preds"]]
            gold = [y for t in parts for y in t["gold"]] if side == "peftkit" else None
            res["accuracy"] = sum(t["accuracy"] * len(t["preds"]) for t in parts) / n
            if gold is not None:
                probs = np.concatenate([t["probs"] for t in parts])
                scores = probability_metrics(gold, probs, data.labels)
                res.update(macro_f1=scores["macro_f1"], ece=scores["ece"])
                res["truncated"] = sum(t["truncated"] for t in parts)
        print(f"[{key}] lm-eval b{best_lm}: acc {lm['accuracy']:.4f} {lm['examples_per_s']:.2f} "
              f"ex/s; peftkit b{best_our}: acc {us['accuracy']:.4f} "
              f"{us['examples_per_s']:.2f} ex/s", flush=True)  # fmt: skip
        lm_flops, our_flops = (flops[side].flops / n for side in ("lm_eval", "peftkit"))
        agree = _agree(lm["preds"], us["preds"])
        row = {
            "task": key,
            "rows": n,
            "template": spec["template"],
            "lm_eval": {
                "batch_size": best_lm,
                "accuracy": lm["accuracy"],
                "examples_per_s": lm["examples_per_s"],
                "chunk_examples_per_s": lm["chunk_examples_per_s"],
                "seconds": lm["seconds"],
                "gflop_per_example": lm_flops / 1e9,
                "gflop_per_s": lm_flops * lm["examples_per_s"] / 1e9,
                "sweep_examples_per_s": sweep["lm_eval"],
            },
            "peftkit": {
                "batch_size": best_our,
                "accuracy": us["accuracy"],
                "macro_f1": us["macro_f1"],
                "ece": us["ece"],
                "examples_per_s": us["examples_per_s"],
                "chunk_examples_per_s": us["chunk_examples_per_s"],
                "seconds": us["seconds"],
                "truncated": us["truncated"],
                "gflop_per_example": our_flops / 1e9,
                "gflop_per_s": our_flops * us["examples_per_s"] / 1e9,
                "sweep_examples_per_s": sweep["peftkit"],
            },
            "prediction_agreement": agree,
            "accuracy_gap_points": 100 * (us["accuracy"] - lm["accuracy"]),
            "speedup": us["examples_per_s"] / lm["examples_per_s"],
            "chunk_speedups": [
                a / b
                for a, b in zip(us["chunk_examples_per_s"], lm["chunk_examples_per_s"], strict=True)
            ],
        }
        if reference is not None:  # the same rows scored in float32, untimed
            ref = ours(reference, data, spec["prompts"], spec["template"], n, best_our,
                       spec.get("demos", 0))  # fmt: skip
            row["float32_reference"] = {
                "accuracy": ref["accuracy"],
                "lm_eval_agreement": _agree(lm["preds"], ref["preds"]),
                "peftkit_agreement": _agree(us["preds"], ref["preds"]),
                "lm_eval_accuracy_gap_points": 100 * (lm["accuracy"] - ref["accuracy"]),
                "peftkit_accuracy_gap_points": 100 * (us["accuracy"] - ref["accuracy"]),
            }
            print(f"[{key}] float32 reference acc {ref['accuracy']:.4f}; agreement with it: "
                  f"lm-eval {row['float32_reference']['lm_eval_agreement']:.3f}, peftkit "
                  f"{row['float32_reference']['peftkit_agreement']:.3f}", flush=True)  # fmt: skip
        results.append(row)
    peak = statistics.median(peaks)
    for row in results:
        for side in ("lm_eval", "peftkit"):
            row[side]["fraction_of_matmul_peak"] = row[side]["gflop_per_s"] / peak
    goals = {
        r["task"]: {
            "speedup": r["speedup"],
            "goal_speedup": 1.3 if r["task"] == "sst2" else 3.0,
            "met_speedup": r["speedup"] >= (1.3 if r["task"] == "sst2" else 3.0),
            "met_accuracy_within_0.5": abs(r["accuracy_gap_points"]) <= 0.5,
        }
        for r in results
    }
    payload = {
        "benchmark": "bench_zeroshot",
        "issue": 4,
        "model": f"smollm2-135m (packaged, {ns.dtype} weights on both sides)",
        "dtype": ns.dtype,
        "environment": env,
        f"matmul_{DTYPE_TAG[ns.dtype]}_gflop_per_s": peak,
        f"matmul_{DTYPE_TAG[ns.dtype]}_gflop_per_s_each": peaks,
        "chunks": ns.chunks,
        "flop_formula_check": formula_check,
        "rows": results,
        "goals": goals,
    }
    out = write_results(ns.out, payload, quick=ns.quick)
    print(
        table(
            [
                [
                    r["task"], r["rows"],
                    f"{100 * r['lm_eval']['accuracy']:.2f}", f"{100 * r['peftkit']['accuracy']:.2f}",
                    f"{r['prediction_agreement']:.3f}",
                    f"{r['lm_eval']['examples_per_s']:.2f} (b{r['lm_eval']['batch_size']})",
                    f"{r['peftkit']['examples_per_s']:.2f} (b{r['peftkit']['batch_size']})",
                    f"{r['speedup']:.2f}x",
                    f"{r['lm_eval']['gflop_per_s']:.1f} / {r['peftkit']['gflop_per_s']:.1f}",
                    f"{peak:.1f}",
                ]
                for r in results
            ],
            ["task", "rows", "lm-eval acc %", "peftkit acc %", "agree", "lm-eval ex/s",
             "peftkit ex/s", "speedup", "GFLOP/s lm-eval / peftkit", "matmul GFLOP/s"],
        )
    )  # fmt: skip
    print(f"results: {out}")


if __name__ == "__main__":
    main()
