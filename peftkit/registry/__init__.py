"""The adapter registry (no torch import): :class:`Registry` (``store``) over an SQLite
index (``index``), what an entry holds (``entries``), what a folder says about itself
(``metadata``: task.json, peftkit.json), its files (``files``), crash-safe writes
(``staging``), the checks and repairs (``check``) and the exchange with peft (``exchange``)."""

from peftkit.registry.entries import Entry
from peftkit.registry.store import Registry

__all__ = ["Entry", "Registry"]
