"""Task adapters: the task a model is for (``task``: labels, method, max length, base), peft
configs from presets (``peft_configs``), the task model with its head (``model``), the
adapter folder format (``folder``), and base-weight rewrites such as PiSSA / OLoRA
(``rewrite``)."""
