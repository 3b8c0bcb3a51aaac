"""Serving adapters from one base: hot-swap and mixed-adapter batches (``adapted``) and the
rank-stacked LoRA kernel they run on (``mixed``)."""
