"""Continual updates of one sentiment adapter: forgetting with and without replay, against a
fresh adapter per domain and one adapter trained on every domain at once.

    .venv/bin/python bench/bench_continual.py          # full run -> bench/results/bench_continual.json
    .venv/bin/python bench/bench_continual.py --quick  # smoke run (48 rows a split, 3 steps)

The built-in recipe ``continual-sentiment`` (MiniLM, one rank-8 LoRA) trains on SST-2, then
Rotten Tomatoes, IMDB (/work/shared/data) and the packaged tweets, in that order. Four arms,
each on the same rows (each domain's ``max_rows`` sample, as the recipe loads it):

- ``replay``: the recipe as shipped: each step continues the adapter of the step before
  (``adapter.init_from: previous``), half of its training rows are replayed from the earlier
  domains (``training.replay``), and half of the parent's weights are blended back in after
  training (``adapter.keep_parent``);
- ``no-replay``: the same chain, ``training.replay`` off (``keep_parent`` kept);
- ``fresh``: a new adapter per domain (``init_from`` and replay off), as ``continual`` does;
- ``joint``: one adapter trained once on every domain's training rows together, the upper
  reference a sequence of updates is measured against.

The tweets add a third label, ``neutral``: they are kept as a label superset (the continued
head gains a row) rather than mapped to two labels, which would drop a third of the domain
and leave the superset path unmeasured. A model that answers ``neutral`` on a two-label
domain is wrong there, for every arm alike.

After each step, every arm's current adapter is scored on the test split of every domain
seen so far: the forgetting matrix (``matrix[arm][after step][domain]``, PNG + JSON). The
goal: with replay, the accuracy on every earlier domain within 1 point of the joint model's,
at a fraction of its training cost (``cost``: total train seconds of the replay chain over
the joint model's; the last update's, which made the adapter compared, over the joint
model's; and the chain's over retraining the joint model at every step, estimated from its
seconds per row). The replay chain's last adapter and the joint one are also compared on
each earlier domain's test rows, paired (``replay_minus_joint_paired``: the bootstrap
interval of the accuracy difference in points, McNemar's p, and whether even the interval's
low end is within 1 point).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, environment, table, write_results  # noqa: E402

RECIPE = "continual-sentiment"
# (domain, data source): the recipe's order
DOMAINS = [
    ("sst2", "sst2"),
    ("rotten_tomatoes", "rotten_tomatoes"),
    ("imdb", "imdb_small"),
    ("tweets", "tweets-sentiment"),
]
ARMS = ("replay", "no-replay", "fresh")


def source(name: str) -> str:
    return str(DATA / name) if (DATA / name).is_dir() else name


def overrides(arm: str, quick: bool, max_rows: int | None = None, max_length: int | None = None):
    """The recipe's overrides for one arm (data read from DATA); ``max_rows`` and
    ``max_length``, when given, replace every task's (the recipe's: 2,000 rows a split,
    128 tokens, 256 for IMDB)."""
    out = [f"data.source={source(DOMAINS[0][1])}", "revisit=false", "training.progress=false"]
    if max_rows:
        out += [f"data.max_rows={max_rows}"]
        out += [f"then.{i}.data.max_rows={max_rows}" for i in range(len(DOMAINS) - 1)]
    if max_length:
        out += [f"training.max_length={max_length}"]
        out += [f"then.{i}.training.max_length={max_length}" for i in range(len(DOMAINS) - 1)]
    for i, (_, name) in enumerate(DOMAINS[1:]):
        out.append(f"then.{i}.data.source={source(name)}")
        if arm in ("no-replay", "fresh"):
            out.append(f"then.{i}.training.replay=null")
        if arm == "fresh":
            out.append(f"then.{i}.adapter.init_from=null")
            out.append(f"then.{i}.adapter.keep_parent=null")  # nothing to keep
    if quick:
        out += ["data.max_rows=48", "training.max_steps=3", "training.max_length=64"]
        out += [f"then.{i}.data.max_rows=48" for i in range(len(DOMAINS) - 1)]
        out += [f"then.{i}.training.max_steps=3" for i in range(len(DOMAINS) - 1)]
        out += [f"then.{i}.training.max_length=64" for i in range(len(DOMAINS) - 1)]
    return out


def run(recipe, work: Path, arm: str) -> tuple[list[str], list[float], Path]:
    """Run ``recipe`` in ``work/arm``: its registered refs and each task's train seconds."""
    from peftkit.run.pipeline import run_recipe

    folder = work / arm
    outcome = run_recipe(recipe, run_dir=folder / "run", registry=folder / "registry",
                         overwrite=True)  # fmt: skip
    metrics = outcome.metrics
    seconds = [metrics["train_seconds"]]
    seconds += [metrics["tasks"][t.name]["train_seconds"] for t in recipe.then]
    return outcome.entries, seconds, folder / "registry"


def domain_data(recipe) -> list[Any]:
    """Each domain's dataset, loaded as the recipe's tasks load it (the same rows)."""
    from peftkit.run.builders import load_task_data

    specs = [recipe.data] + [t.data for t in recipe.then]
    return [load_task_data(spec)[0] for spec in specs]


def write_joint(datasets: list[Any], folder: Path) -> Path:
    """Every domain's rows in one JSONL folder (labels by name; the union of label sets)."""
    labels: list[str] = []
    for data in datasets:
        labels += [x for x in data.labels if x not in labels]
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        with open(folder / f"{split}.jsonl", "w") as fh:
            for data in datasets:
                part = data.split(split)
                for text, y in zip(part.texts, part.labels, strict=True):
                    fh.write(json.dumps({"text": text, "label": data.labels[y]}) + "\n")
    (folder / "labels.json").write_text(json.dumps(labels))
    return folder


def predicted(model, ref: str, data) -> tuple[float, list[str]]:
    """``ref``'s accuracy on ``data``'s test split and its predicted label names."""
    test = data.split("test")
    preds = [p.label for p in model.predict(list(test.texts), adapter=ref)]
    gold = [data.labels[y] for y in test.labels]
    return sum(p == g for p, g in zip(preds, gold, strict=True)) / max(len(gold), 1), preds


def score(base, registry: Path, refs: list[str], datasets: list[Any]):
    """``[after step k][domain] = accuracy`` of ``refs[k]`` on every domain up to k, and the
    last step's predictions on each domain."""
    from peftkit.serving.adapted import AdaptedModel

    rows, last = [], {}
    with AdaptedModel(base, registry) as model:
        for k, ref in enumerate(refs):
            row = {}
            for j in range(k + 1):
                acc, preds = predicted(model, ref, datasets[j])
                row[DOMAINS[j][0]] = round(acc, 4)
                if k == len(refs) - 1:
                    last[DOMAINS[j][0]] = preds
            rows.append(row)
    return rows, last


def score_all(base, registry: Path, ref: str, datasets: list[Any]):
    """``[domain] = accuracy`` of ``ref`` on every domain, and its predictions there."""
    from peftkit.serving.adapted import AdaptedModel

    with AdaptedModel(base, registry) as model:
        out = {d: predicted(model, ref, x) for (d, _), x in zip(DOMAINS, datasets, strict=True)}
    return {d: round(a, 4) for d, (a, _) in out.items()}, {d: p for d, (_, p) in out.items()}


def paired_gaps(datasets: list[Any], replay: dict, joint: dict) -> dict[str, dict[str, Any]]:
    """Replay's last adapter minus the joint one on each earlier domain's test rows: the
    paired bootstrap interval of the accuracy difference (points) and McNemar's p."""
    from peftkit.metrics.intervals import paired_comparison

    out = {}
    for (d, _), data in zip(DOMAINS[:-1], datasets, strict=False):
        gold = [data.labels[y] for y in data.split("test").labels]
        names = sorted(set(gold) | set(replay[d]) | set(joint[d]))
        ids = {n: i for i, n in enumerate(names)}
        cmp = paired_comparison([ids[g] for g in gold], [ids[p] for p in joint[d]],
                                [ids[p] for p in replay[d]], names)  # fmt: skip
        diff = cmp.difference["accuracy"]
        out[d] = {
            "points": round(100 * diff.estimate, 2),
            "ci95": [round(100 * diff.low, 2), round(100 * diff.high, 2)],
            "mcnemar_p": round(cmp.mcnemar_p, 4),
            "verdict": cmp.verdict("accuracy").replace("B", "replay").replace("A", "joint"),
            # the goal read with its uncertainty: even the interval's low end within 1 point
            "within_1_point_at_95": diff.low >= -0.01,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", default=None, help="folder for runs (default: a temp one)")
    parser.add_argument("--out", default="bench_continual")
    parser.add_argument("--max-rows", type=int, default=None, help="rows per split, every task")
    parser.add_argument("--max-length", type=int, default=None, help="tokens, every task")
    parser.add_argument("--share", type=float, default=None, help="replay share (recipe: 0.5)")
    parser.add_argument("--arms", default=",".join(ARMS), help="of replay,no-replay,fresh")
    parser.add_argument(
        "--continued-lr", type=float, default=None, help="learning rate of continued steps"
    )
    parser.add_argument("--seed", type=int, default=None, help="training.seed, every task and arm")
    parser.add_argument(
        "--keep-parent", type=float, default=None,
        help="adapter.keep_parent of the continued steps (the recipe's: 0.5; 0: off)",
    )  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peftkit.config.recipes import load_recipe
    from peftkit.models.base import load_base

    work = Path(args.work or tempfile.mkdtemp(prefix="peftkit-bench-continual-"))
    env = environment()
    refs, seconds, registries = {}, {}, {}
    arms = [a for a in ARMS if a in args.arms.split(",")]
    seeded = (
        []
        if args.seed is None
        else [f"training.seed={args.seed}"]
        + [f"then.{i}.training.seed={args.seed}" for i in range(len(DOMAINS) - 1)]
    )
    for arm in arms:
        print(f"== {arm}", flush=True)
        extra = []
        if arm == "replay" and args.share:
            extra += [
                f"then.{i}.training.replay.share={args.share}" for i in range(len(DOMAINS) - 1)
            ]
        if arm != "fresh" and args.continued_lr:  # the steps that continue an adapter
            extra += [f"then.{i}.adapter.learning_rate={args.continued_lr}"
                      for i in range(len(DOMAINS) - 1)]  # fmt: skip
        if arm != "fresh" and args.keep_parent is not None:
            extra += [f"then.{i}.adapter.keep_parent={args.keep_parent}"
                      for i in range(len(DOMAINS) - 1)]  # fmt: skip
        recipe = load_recipe(
            RECIPE, overrides(arm, args.quick, args.max_rows, args.max_length) + extra + seeded
        )
        refs[arm], seconds[arm], registries[arm] = run(recipe, work, arm)
    recipe = load_recipe(RECIPE, overrides("replay", args.quick, args.max_rows, args.max_length))
    datasets = domain_data(recipe)
    joint_data = write_joint(datasets, work / "joint-data")
    longest = max(
        [recipe.training.max_length] + [t.training.get("max_length", 0) for t in recipe.then]
    )
    print("== joint", flush=True)
    joint_recipe = load_recipe(
        RECIPE,
        [f"data.source={joint_data}", "data.max_rows=null", "then=[]", "revisit=false",
         "registry.name=joint-sentiment", "training.progress=false",
         f"training.max_length={64 if args.quick else longest}"]
        + (["training.max_steps=3"] if args.quick else []) + seeded[:1],
    )  # fmt: skip
    joint_refs, joint_seconds, joint_registry = run(joint_recipe, work, "joint")

    base = load_base(recipe.base.source)
    scored = {arm: score(base, registries[arm], refs[arm], datasets) for arm in arms}
    matrix = {arm: rows for arm, (rows, _) in scored.items()}
    joint, joint_preds = score_all(base, joint_registry, joint_refs[0], datasets)
    payload = report(args, env, matrix, joint, seconds, joint_seconds[0], datasets, joint_data)
    if "replay" in scored:
        payload["replay_minus_joint_paired"] = paired_gaps(datasets, scored["replay"][1],
                                                           joint_preds)  # fmt: skip
        print(f"paired (points, 95% interval): {payload['replay_minus_joint_paired']}")
    path = write_results(args.out, payload, quick=args.quick)
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    if args.work is None:
        shutil.rmtree(work)  # the temp folder made above
    return 0


def report(args, env, matrix, joint, seconds, joint_seconds, datasets, joint_data) -> dict:
    names = [d for d, _ in DOMAINS]
    arms = list(matrix)
    final = {arm: matrix[arm][-1] for arm in arms}
    gaps = {d: round(100 * (final["replay"][d] - joint[d]), 2) for d in names[:-1]}
    train_rows = [len(d.split("train")) for d in datasets]
    per_row = joint_seconds / max(sum(train_rows), 1)
    each_step = sum(per_row * sum(train_rows[: k + 1]) for k in range(len(train_rows)))
    replay_total = sum(seconds["replay"])
    rows = [[arm, *(f"{100 * final[arm][d]:.1f}" for d in names), f"{sum(seconds[arm]):.0f}"]
            for arm in arms]  # fmt: skip
    rows.append(["joint", *(f"{100 * joint[d]:.1f}" for d in names), f"{joint_seconds:.0f}"])
    print("\naccuracy (%) after the last step, on each domain's test split")
    print(table(rows, ["arm", *names, "train s"]))
    print(f"replay - joint on earlier domains (points): {gaps}")
    print(f"train seconds, replay chain / joint once: {replay_total / joint_seconds:.2f}; "
          f"last update / joint: {seconds['replay'][-1] / joint_seconds:.2f}")  # fmt: skip
    return {
        "benchmark": "bench_continual",
        "environment": env,
        "quick": args.quick,
        "recipe": RECIPE,
        "overrides": {
            "max_rows": args.max_rows,
            "max_length": args.max_length,
            "replay_share": args.share,
            "continued_lr": args.continued_lr,
            "seed": args.seed,
            "keep_parent": args.keep_parent,
        },  # fmt: skip
        "domains": names,
        "train_rows": dict(zip(names, train_rows, strict=True)),
        "test_rows": {d: len(x.split("test")) for d, x in zip(names, datasets, strict=True)},
        "tweets": "kept as 3 labels (negative, neutral, positive): a label superset",
        "matrix": matrix,
        "joint": joint,
        "train_seconds": {**{a: seconds[a] for a in arms}, "joint": joint_seconds},
        "replay_minus_joint_points": gaps,
        "goal_within_1_point": all(g >= -1.0 for g in gaps.values()),
        "cost": {
            "replay_over_joint_once": round(replay_total / joint_seconds, 3),
            # the update that made the final adapter against retraining on everything
            "last_update_over_joint": round(seconds["replay"][-1] / joint_seconds, 3),
            "replay_over_joint_each_step_estimated": round(replay_total / each_step, 3),
            "note": "joint at every step: the joint model's seconds per training row times the "
            "rows of every domain so far, summed over the steps (an estimate, not a run)",
        },
    }


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = payload["domains"]
    arms = [*payload["matrix"], "joint"]
    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 3.8), squeeze=False)
    for ax, arm in zip(axes[0], arms, strict=True):
        rows = [payload["joint"]] if arm == "joint" else payload["matrix"][arm]
        grid = np.full((len(rows), len(names)), np.nan)
        for i, row in enumerate(rows):
            for j, d in enumerate(names):
                if d in row:
                    grid[i, j] = 100 * row[d]
        ax.imshow(grid, vmin=40, vmax=100, cmap="viridis")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ylabels = ["all at once"] if arm == "joint" else [f"after {d}" for d in names]
        ax.set_yticks(range(len(rows)), ylabels, fontsize=8)
        ax.set_title(arm)
    fig.suptitle("accuracy (%) on each domain's test split")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
