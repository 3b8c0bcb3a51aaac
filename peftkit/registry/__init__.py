"""The adapter registry (no torch import): :class:`Registry` (``store``) over an SQLite
index (``index``), what an entry holds (``entries``), what a folder says about itself
(``metadata``: task.json, peftkit.json), its files (``files``), crash-safe writes
(``staging``) and the checks and repairs (``check``)."""

from peftkit.registry.entries import Entry
from peftkit.registry.store import Registry

__all__ = ["Entry", "Registry"]
