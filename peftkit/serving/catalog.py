"""The registry as ``peftkit serve`` sees it: the adapters registered for its base, a
reference (``sst2``, ``sst2@3``, ``sst2@production``) pinned to the version that answers,
and :class:`ApiError`, the error a route answers with its HTTP status."""

from __future__ import annotations

from collections.abc import Mapping

from peftkit.errors import ConfigError, PeftkitError, RegistryError, did_you_mean
from peftkit.registry.entries import Entry, check_name
from peftkit.registry.store import Registry

__all__ = ["ApiError", "Catalog"]


class ApiError(PeftkitError):
    """An error answered with ``status``: ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


class Catalog:
    """The registry's adapters for this base; pins a reference to ``name@N``. Lookups are
    cached until the registry's generation changes (one cheap query per request)."""

    def __init__(self, registry: Registry, fingerprint: str) -> None:
        self.registry = registry
        self.fingerprint = fingerprint
        self._generation: int | None = None
        self._entries: list[Entry] = []
        self._pinned: dict[str, Entry] = {}
        self._aliases: dict[str, dict[str, str]] = {}  # name -> {alias: name@N}

    def entries(self) -> list[Entry]:
        """Every version registered for this base, by name then version."""
        generation = self.registry.generation()
        if generation != self._generation:
            self._entries = [
                e for e in self.registry.list() if e.base_fingerprint == self.fingerprint
            ]
            self._pinned.clear()
            self._aliases = {}
            for ref, target in self.registry.aliases().items():
                name, _, alias = ref.partition("@")
                self._aliases.setdefault(name, {})[alias] = target
            self._generation = generation
        return self._entries

    def aliases(self, name: str) -> dict[str, str]:
        """``{"production": "sst2@3"}``: ``name``'s aliases as of the last lookup."""
        return self._aliases.get(name, {})

    def names(self) -> list[str]:
        return sorted({e.name for e in self.entries()})

    def pin(self, ref: str, where: str) -> Entry:
        """The entry ``ref`` means now; ApiError 422 (bad form), 404 (unknown, with the
        closest names) or 409 (registered for another base)."""
        entries = self.entries()
        if ref in self._pinned:
            return self._pinned[ref]
        name = ref.partition("@")[0]
        try:
            check_name(name)
            entry = self.registry.get(ref)
        except ConfigError as exc:
            raise ApiError(422, f"{where}: {exc}") from None
        except RegistryError:
            raise ApiError(404, self._missing(ref, entries)) from None
        if entry.base_fingerprint != self.fingerprint:
            raise ApiError(
                409,
                f"{where}: adapter {entry.ref} was trained on another base than this server "
                f"serves; adapters here: {', '.join(self.names()) or 'none'}",
            )
        self._pinned[ref] = entry
        return entry

    def _missing(self, ref: str, entries: list[Entry]) -> str:
        name, _, version = ref.partition("@")
        versions = [str(e.version) for e in entries if e.name == name]
        if versions and version and not version.isdigit() and version != "latest":
            known = sorted(self.aliases(name))
            return f"adapter {name!r} has no alias {version!r}; its aliases: " + (
                ", ".join(known) or "none"
            )
        if versions:
            return (
                f"adapter {name!r} has no version {version!r}; its versions: {', '.join(versions)}"
            )
        names = self.names()
        return (
            f"no adapter named {name!r}{did_you_mean(name, names)}; "
            f"registered for this base: {', '.join(names[:20]) or 'none'}"
        )
