"""The adapter registry: an SQLite index (``store``), what an entry holds (``entries``) and
its files on disk (``files``). No torch import."""

from peftkit.registry.entries import Entry
from peftkit.registry.store import Registry

__all__ = ["Entry", "Registry"]
