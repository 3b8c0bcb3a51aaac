"""peftkit: adapt one base model to many text-classification tasks, cheaply.

Parameter-efficient adapters (LoRA, QLoRA, prefix, prompt tuning, IA3) and prompting
(templates, verbalizers, calibration) on top of transformers, peft, accelerate,
bitsandbytes and evaluate; a registry that ties every adapter to its base; hot-swap and
mixed-adapter batches in a running program.
"""

import logging as _logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


class _NoKernelsHubNotice(_logging.Filter):
    """bitsandbytes warns on import, on every CPU with AVX512-BF16, that it could not fetch
    an optional kernel from the hub (offline here, and not needed: its own CPU kernel
    runs). peftkit cannot act on it, and it printed on every run, quantized or not."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "from kernels-community" not in str(record.msg)


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHubNotice())


# The main names, each imported from its module on first use: torch and transformers load
# slowly, and `import peftkit` (the CLI, reading a recipe) must not pay for them. The
# imports under TYPE_CHECKING say the same to a type checker and an editor.
_LAZY = {
    "AdaptedModel": "peftkit.serving.adapted",
    "AdapterSpec": "peftkit.config.presets",
    "Base": "peftkit.models.base",
    "PeftkitError": "peftkit.errors",
    "Prediction": "peftkit.serving.adapted",
    "Recipe": "peftkit.config.recipes",
    "Registry": "peftkit.registry.store",
    "TaskInfo": "peftkit.adapters.task",
    "TaskModel": "peftkit.adapters.model",
    "TextDataset": "peftkit.data.load",
    "TrainConfig": "peftkit.config.training",
    "TrainResult": "peftkit.training.train",
    "build_task_model": "peftkit.adapters.model",
    "evaluate_prompts": "peftkit.prompting.evaluation",
    "load_base": "peftkit.models.base",
    "load_data": "peftkit.data.load",
    "load_preset": "peftkit.config.presets",
    "load_recipe": "peftkit.config.recipes",
    "run_recipe": "peftkit.run.pipeline",
    "train": "peftkit.training.train",
}

# spelled out, not computed from _LAZY: linters and type checkers read __all__ statically
__all__ = [
    "__version__",
    "AdaptedModel",
    "AdapterSpec",
    "Base",
    "PeftkitError",
    "Prediction",
    "Recipe",
    "Registry",
    "TaskInfo",
    "TaskModel",
    "TextDataset",
    "TrainConfig",
    "TrainResult",
    "build_task_model",
    "evaluate_prompts",
    "load_base",
    "load_data",
    "load_preset",
    "load_recipe",
    "run_recipe",
    "train",
]

if TYPE_CHECKING:
    from peftkit.adapters.model import TaskModel, build_task_model
    from peftkit.adapters.task import TaskInfo
    from peftkit.config.presets import AdapterSpec, load_preset
    from peftkit.config.recipes import Recipe, load_recipe
    from peftkit.config.training import TrainConfig
    from peftkit.data.load import TextDataset, load_data
    from peftkit.errors import PeftkitError
    from peftkit.models.base import Base, load_base
    from peftkit.prompting.evaluation import evaluate_prompts
    from peftkit.registry.store import Registry
    from peftkit.run.pipeline import run_recipe
    from peftkit.serving.adapted import AdaptedModel, Prediction
    from peftkit.training.train import TrainResult, train


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # found once: later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
