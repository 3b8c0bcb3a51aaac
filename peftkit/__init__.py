"""peftkit: adapt one base model to many text-classification tasks, cheaply.

Parameter-efficient adapters (LoRA, QLoRA, prefix, prompt tuning, IA3) and prompting
(templates, verbalizers, calibration) on top of transformers, peft, accelerate,
bitsandbytes and evaluate; a registry that ties every adapter to its base; hot-swap and
mixed-adapter batches in a running program.
"""

__version__ = "0.1.0"
