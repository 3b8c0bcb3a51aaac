"""Task adapters: peft configs and the task model with its head (``model``), the adapter
folder format (``folder``), and base-weight rewrites such as PiSSA / OLoRA (``rewrite``)."""
