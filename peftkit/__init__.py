"""peftkit: adapt one base model to many text-classification tasks, cheaply.

Parameter-efficient adapters (LoRA, QLoRA, prefix, prompt tuning, IA3) and prompting
(templates, verbalizers, calibration) on top of transformers, peft, accelerate,
bitsandbytes and evaluate; a registry that ties every adapter to its base; hot-swap and
mixed-adapter batches in a running program.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # the main entry points, imported on first use (torch and transformers load slowly)
    lazy = {
        "AdaptedModel": "peftkit.switch",
        "Registry": "peftkit.registry",
        "evaluate_prompts": "peftkit.prompt_eval",
        "load_base": "peftkit.base",
        "load_data": "peftkit.data",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
