"""Model fingerprints: what an adapter records about the base it was trained on.

A fingerprint names the architecture, hashes the config (minus fields that do not change
the function, such as dtype or the quantization block) and identifies the weights. The
weights identity is taken from the checkpoint files when the model came from a folder
(sizes, safetensors headers and sampled bytes: milliseconds, and no need to read a large
file whole), else from the parameters in memory. Quantization is recorded beside the id,
not inside it: a LoRA trained on a 4-bit base applies to the same base in 8-bit or fp32,
and peftkit warns rather than refuses on that difference.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "name_or_path",
    "torch_dtype",
    "dtype",
    "quantization_config",
    "transformers_version",
    "_commit_hash",
    "architectures",
    "use_cache",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "tie_word_embeddings",
    "id2label",
    "label2id",
}


@dataclass(frozen=True)
class Fingerprint:
    architecture: str
    config_hash: str
    weights_hash: str
    quantization: str | None
    source: str

    @property
    def id(self) -> str:
        """The identity adapters are checked against (quantization excluded)."""
        raw = f"{self.architecture}|{self.config_hash}|{self.weights_hash}"
        return hashlib.sha256(raw.encode()).hexdigest()[:24]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "id": self.id}

    def describe(self) -> str:
        quant = self.quantization or "full precision"
        return f"{self.architecture} from {self.source!r} ({quant}, id {self.id})"


def config_hash(config: Any) -> str:
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def files_hash(folder: Path) -> str | None:
    """Identity of the weight files in ``folder`` (``None`` when it holds none)."""
    files = sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.bin")))
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as fh:
            for i in range(8):
                fh.seek(size * i // 8)
                h.update(fh.read(1 << 15))
    return h.hexdigest()[:16]


def tensors_hash(model: torch.nn.Module) -> str:
    """Identity of the parameters in memory: names, shapes and a strided sample of values."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        step = max(1, flat.numel() // 256)
        sample = flat[::step][:256].to("cpu")
        if sample.dtype.is_floating_point:
            sample = sample.float()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint_model(
    model: Any,
    *,
    source: str,
    folder: str | None = None,
    quantization: str | None = None,
) -> Fingerprint:
    config = model.config
    arch = type(model).__name__
    base_arch = config.model_type
    weights = None
    if folder is not None and Path(folder).is_dir():
        weights = files_hash(Path(folder))
    if weights is None:
        if quantization is not None:
            # k-bit weights in memory differ from the checkpoint's; hash only what
            # bitsandbytes leaves alone (embeddings and norms) to stay stable.
            weights = _unquantized_hash(model)
        else:
            weights = tensors_hash(model)
    return Fingerprint(
        architecture=f"{base_arch}:{arch}",
        config_hash=config_hash(config),
        weights_hash=weights,
        quantization=quantization,
        source=source,
    )


def _unquantized_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "embed" in name or "norm" in name:
            flat = tensor.detach().reshape(-1)[:4096].float().cpu()
            h.update(name.encode())
            h.update(flat.numpy().tobytes())
    return h.hexdigest()[:16]
