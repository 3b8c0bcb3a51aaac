"""Errors a user can act on.

Every error peftkit raises for bad input is a :class:`PeftkitError` (or a subclass): the
message says what was wrong, where (file, line, key, adapter name) and what would be
valid. The CLI prints the message on one line and exits non-zero; library callers can
catch the class.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftkitError(Exception):
    """Base class: bad input or a refused operation, with an actionable message."""


class ConfigError(PeftkitError, ValueError):
    """A recipe, preset, prompt or option is invalid."""


class DataError(PeftkitError, ValueError):
    """A data file or corpus cannot be used as given."""


class ModelError(PeftkitError, ValueError):
    """A model source or quantization setting cannot be used."""


class RegistryError(PeftkitError):
    """The adapter registry refused an operation (unknown name, bad hash, wrong base)."""


class IntegrityError(RegistryError):
    """Stored files do not match the hashes recorded for them."""


class FingerprintMismatch(RegistryError):
    """An adapter was trained on a different base model than the one loaded."""


class TrainingError(PeftkitError, RuntimeError):
    """Training cannot go on (for example: the loss became NaN)."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The valid names closest to ``name`` (for "did you mean" messages)."""
    choices = list(choices)
    return difflib.get_close_matches(name, choices, n=n, cutoff=0.5)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ready-to-append hint: ``" (did you mean 'x'?)"``, or ``""`` when nothing is close."""
    near = closest(name, choices)
    if not near:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in near) + "?)"
