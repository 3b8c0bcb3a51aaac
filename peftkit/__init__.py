"""peftkit: adapt one base model to many text-classification tasks, cheaply.

Parameter-efficient adapters (LoRA, QLoRA, prefix, prompt tuning, IA3) and prompting
(templates, verbalizers, calibration) on top of transformers, peft, accelerate,
bitsandbytes and evaluate; a registry that ties every adapter to its base; hot-swap and
mixed-adapter batches in a running program.
"""

import logging as _logging

__version__ = "0.1.0"


class _NoKernelsHubNotice(_logging.Filter):
    """bitsandbytes warns on import, on every CPU with AVX512-BF16, that it could not fetch
    an optional kernel from the hub (offline here, and not needed: its own CPU kernel
    runs). peftkit cannot act on it, and it printed on every run, quantized or not."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "from kernels-community" not in str(record.msg)


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHubNotice())


def __getattr__(name: str):
    # the main entry points, imported on first use (torch and transformers load slowly)
    lazy = {
        "AdaptedModel": "peftkit.serving.adapted",
        "Registry": "peftkit.registry.store",
        "evaluate_prompts": "peftkit.prompting.evaluation",
        "load_base": "peftkit.models.base",
        "load_data": "peftkit.data.load",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
