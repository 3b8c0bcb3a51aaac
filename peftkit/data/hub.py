"""Hugging Face hub datasets (``"hub:<id>"``) as tables: needs ``datasets`` and a network."""

from __future__ import annotations

import logging

from peftkit.data.files import FILE_NAMES, Fields, RawTable, refuse_blank_texts, require_fields
from peftkit.errors import DataError

__all__ = ["read_hub"]

log = logging.getLogger(__name__)


def read_hub(
    hub_id: str, fields: Fields, not_local: str, need_train: bool = True
) -> tuple[dict[str, RawTable], tuple[str, ...] | None]:
    """The splits of hub dataset ``hub_id`` (needs ``datasets`` and a network) and, when its
    label column is a ``ClassLabel``, the label names. ``not_local`` starts every error.
    The train split is required unless ``need_train`` is False."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{not_local}; loading it from the Hugging Face hub needs the `datasets` package "
            "(pip install 'peftkit[hub]') and a network"
        ) from None
    try:
        loaded = datasets.load_dataset(hub_id)
    except Exception as e:  # whatever a remote load raises, the user sees it, wrapped
        raise DataError(
            f"{not_local}; loading it from the Hugging Face hub failed: {type(e).__name__}: {e}"
        ) from e
    tables: dict[str, RawTable] = {}
    names: tuple[str, ...] | None = None
    for split, aliases in FILE_NAMES.items():
        key = next((a for a in aliases if a in loaded), None)
        if key is None:
            continue
        ds = loaded[key]
        where = f"hub:{hub_id} [{key}]"
        require_fields(where, 1, ds.column_names, fields)
        raw = list(ds[fields.label])
        if split != "train" and raw and all(y == -1 for y in raw):
            log.info("%s has no labels (all -1); leaving the split out", where)
            continue
        names = names or tuple(getattr(ds.features[fields.label], "names", None) or ()) or None
        pairs = None
        if fields.pair and fields.pair in ds.column_names:
            pairs = list(ds[fields.pair])
        elif fields.pair_optional:
            pairs = [None] * len(raw)
        rows = list(range(1, len(raw) + 1))
        tables[split] = RawTable(where, list(ds[fields.text]), pairs, raw, rows)
        refuse_blank_texts(tables[split], fields, unit="row")
    if not tables or (need_train and "train" not in tables):
        raise DataError(f"hub:{hub_id} has no train split; it has: {', '.join(loaded)}")
    return tables, names
