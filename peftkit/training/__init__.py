"""Training: one Accelerate loop for every method (``train``, ``loop``), its schedule and
checkpoints, and the few-shot heads (``prototypes``, ``contrastive``)."""
