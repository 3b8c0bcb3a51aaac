"""Run one training in a child process (for the kill -9 / resume test)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from helpers import synthetic  # noqa: E402

from peftkit.config.presets import load_preset  # noqa: E402
from peftkit.models.base import load_base  # noqa: E402
from peftkit.training.train import TrainConfig, train  # noqa: E402

model_dir, run_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = load_base(model_dir)
config = TrainConfig(
    max_steps=steps,
    batch_size=8,
    learning_rate=5e-2,
    checkpoint_every=5,
    eval_every=1000,
    patience=None,
    progress=False,
)
result = train(base, load_preset("lora"), synthetic("sentiment", n=400), config, run_dir)
print(f"steps={result.steps} resumed_from={result.resumed_from}")
