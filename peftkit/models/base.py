"""Base models: load a frozen (optionally k-bit) model and its tokenizer, placed by Accelerate.

``load_base`` accepts a packaged name (``minilm``, ``smollm2-135m``), a local folder, or a
hub id (passed through to transformers for users who are online)::

    from peftkit.models.base import load_base
    base = load_base("minilm")                          # encoder features, fp32
    base = load_base("smollm2-135m", quantization="4bit")  # causal LM, NF4 weights
    model, tokenizer = base                             # unpacks like a pair

Quantization goes through ``transformers.BitsAndBytesConfig``. ``dtype`` sets the
unquantized weights and the 4-bit layers' compute dtype: float32 on CPU (bf16 is emulated,
and slow, on CPUs without AVX512-BF16 / AMX) and bfloat16 on CUDA by default;
``dtype="bfloat16"`` on a CPU with AVX512-BF16 / AMX runs the matmuls natively (several
times float32's rate), and peftkit warns when the CPU would only emulate it. The returned
:class:`Base` carries a :class:`~peftkit.models.fingerprint.Fingerprint` that adapters record, so
that an adapter is never loaded onto a base it was not trained on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import ConfigError, ModelError, did_you_mean
from peftkit.models.assets import PACKAGED_MODELS, resolve_packaged
from peftkit.models.fingerprint import Fingerprint, fingerprint_model

log = logging.getLogger(__name__)

KINDS = ("encoder", "causal-lm")
QUANTIZATIONS = (None, "8bit", "4bit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Modules that must stay unquantized: heads (tied or not) lose too much as k-bit weights.
SKIP_MODULES = ["lm_head", "score", "classifier", "pooler"]


@dataclass(frozen=True)
class Base:
    """A loaded base model: the model, its tokenizer, what it is and where it came from."""

    model: Any
    tokenizer: Any
    kind: str
    source: str
    quantization: str | None
    fingerprint: Fingerprint

    def __iter__(self) -> Iterator[Any]:
        yield self.model
        yield self.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def default_device_map() -> str | dict[str, str]:
    """Accelerate's ``"auto"`` placement where accelerators exist, else everything on CPU."""
    if torch.cuda.is_available():
        return "auto"
    return {"": "cpu"}


def quantization_config(
    quantization: str | None,
    *,
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
    on_cuda: bool | None = None,
) -> Any:
    """The ``BitsAndBytesConfig`` for ``"8bit"`` / ``"4bit"`` (NF4), or ``None``.

    Raises :class:`ModelError` when bitsandbytes cannot quantize on this setup, saying why
    and what would work instead.
    """
    if quantization not in QUANTIZATIONS:
        raise ConfigError(
            f"quantization={quantization!r} is not valid; use one of None, '8bit', '4bit'"
            + did_you_mean(str(quantization), ["8bit", "4bit"])
        )
    if quantization is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise ModelError(
            f"quantization={quantization!r} needs bitsandbytes, which failed to import ({exc}). "
            "Install it with `pip install 'bitsandbytes>=0.50'` (CPU and CUDA wheels), "
            "or load the base in full precision (quantization=None)."
        ) from exc
    from transformers import BitsAndBytesConfig

    if on_cuda is None:
        on_cuda = torch.cuda.is_available()
    if compute_dtype is None:  # the device's default dtype
        compute_dtype = resolve_dtype(None, on_cuda=on_cuda)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(SKIP_MODULES))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=list(SKIP_MODULES),
    )


def resolve_dtype(dtype: torch.dtype | str | None, *, on_cuda: bool) -> torch.dtype:
    """``dtype`` (a name in ``DTYPES``, a torch dtype, or None for the device's default) as a
    torch dtype; warns when a CPU would emulate a half-precision dtype instead of running it."""
    if dtype is None:
        return torch.bfloat16 if on_cuda else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(
                f"dtype={dtype!r} is not valid; use one of {', '.join(DTYPES)}"
                + did_you_mean(dtype, DTYPES)
            )
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ConfigError(f"dtype={dtype} is not valid; use one of {', '.join(DTYPES)}")
    if not on_cuda and not cpu_runs_natively(dtype):
        log.warning(
            "dtype %s on this CPU: it has no %s, so matmuls are emulated and usually run "
            "slower than float32",
            str(dtype).removeprefix("torch."),
            "AMX-FP16" if dtype == torch.float16 else "AVX512-BF16 or AMX",
        )
    return dtype


def cpu_runs_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU has instructions for ``dtype`` matmuls (float32 always)."""
    checks = {
        torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
        torch.float16: ("_is_amx_fp16_supported",),
    }.get(dtype)
    if checks is None:
        return True
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def infer_kind(config: Any) -> str:
    """``"causal-lm"`` for decoder-only architectures, else ``"encoder"``."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHeadModel" in archs:
        return "causal-lm"
    if getattr(config, "is_decoder", False) or config.model_type in (
        "llama",
        "gpt2",
        "mistral",
        "qwen2",
        "phi",
        "gemma",
        "gpt_neox",
        "opt",
        "smollm3",
    ):
        return "causal-lm"
    return "encoder"


def load_base(
    source: str | Path,
    *,
    kind: str = "auto",
    quantization: str | None = None,
    double_quant: bool = False,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, str] | None = None,
    offload_folder: str | Path | None = None,
    trust_remote_code: bool = False,
) -> Base:
    """Load ``source`` as a frozen base model plus tokenizer.

    Args:
        source: packaged name (``minilm``, ``smollm2-135m``), local folder, or hub id.
        kind: ``"encoder"`` (head-less ``AutoModel``: features for adapters and heads),
            ``"causal-lm"`` (``AutoModelForCausalLM``), or ``"auto"`` (from the config).
        quantization: ``None``, ``"8bit"`` or ``"4bit"`` (NF4; ``double_quant`` optional).
        dtype: weights dtype for the unquantized parts, a ``torch.dtype`` or its name in
            ``DTYPES`` (default float32 on CPU, bfloat16 on CUDA).
        device_map / max_memory / offload_folder: Accelerate placement (default: ``"auto"``
            on CUDA, everything on CPU otherwise; CPU/disk offload where it applies).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if kind not in (*KINDS, "auto"):
        raise ConfigError(
            f"kind={kind!r} is not valid; use 'encoder', 'causal-lm' or 'auto'"
            + did_you_mean(kind, KINDS)
        )
    name = str(source)
    folder, load_kwargs = _resolve_source(name)
    on_cuda = torch.cuda.is_available() and device_map not in ("cpu", {"": "cpu"})
    dtype = resolve_dtype(dtype, on_cuda=on_cuda)
    # 4-bit layers compute in the weights' dtype: float32 on CPU and bfloat16 on CUDA unless
    # asked otherwise (bfloat16 on an AMX CPU: a 4-bit forward 2.6x, a QLoRA step 1.7-1.9x
    # float32's speed; bench/results/probe_qlora_dtype.json)
    qconfig = quantization_config(
        quantization, double_quant=double_quant, compute_dtype=dtype, on_cuda=on_cuda
    )

    config = model_config(name, trust_remote_code=trust_remote_code)
    if kind == "auto":
        kind = infer_kind(config)
    if device_map is None:
        device_map = default_device_map()
    if qconfig is not None and offload_folder is not None and quantization == "4bit":
        raise ModelError(
            "4-bit bases cannot be offloaded to disk (bitsandbytes keeps k-bit "
            "weights on the compute device); drop offload_folder or use '8bit' "
            "with llm_int8_enable_fp32_cpu_offload through a custom device_map"
        )
    auto_cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    kwargs: dict[str, Any] = dict(
        dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code, **load_kwargs
    )
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    try:
        model = auto_cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        if qconfig is not None:
            raise ModelError(
                f"could not load {name!r} with quantization={quantization!r}: {exc}. "
                "k-bit loading needs bitsandbytes with a backend for this device "
                "(CPU and CUDA work); try quantization=None to load in full precision."
            ) from exc
        raise
    if quantization == "4bit" and not on_cuda:
        keep_4bit_layout(model)
    tokenizer = AutoTokenizer.from_pretrained(
        folder, trust_remote_code=trust_remote_code, **load_kwargs
    )
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; padding is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    fp = fingerprint_model(model, source=name, folder=folder, quantization=quantization)
    return Base(
        model=model,
        tokenizer=tokenizer,
        kind=kind,
        source=name,
        quantization=quantization,
        fingerprint=fp,
    )


def model_config(source: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of ``source`` (a packaged name, folder or hub id), read
    without the weights: a cheap check that the model can be found, before any work.
    ModelError when it cannot (not installed, no such folder, offline and not cached)."""
    from transformers import AutoConfig

    name = str(source)
    folder, load_kwargs = _resolve_source(name)
    try:
        return AutoConfig.from_pretrained(
            folder, trust_remote_code=trust_remote_code, **load_kwargs
        )
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        hint = (
            " (HF_HUB_OFFLINE is set: a hub id loads only from the local cache; set "
            "HF_HUB_OFFLINE=0 when online, or give a local folder)"
            if offline and folder == name
            else ""
        )
        raise ModelError(
            f"cannot load the model config of {name!r}: {_first_line(exc)}{hint}"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _resolve_source(name: str) -> tuple[str, dict[str, Any]]:
    """Map a packaged name, a folder or a hub id to what ``from_pretrained`` takes."""
    if name in PACKAGED_MODELS:
        return str(resolve_packaged(name)), {}
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelError(
                f"model folder {path} has no config.json; a model folder is what "
                "`save_pretrained` writes (config.json + weights)"
            )
        return str(path), {}
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path or "/" not in name:
        raise ModelError(
            f"unknown model source {name!r}: not a packaged model, not an existing folder, "
            f"and not a hub id of the form 'org/name'. Packaged models: "
            f"{', '.join(sorted(PACKAGED_MODELS))}" + did_you_mean(name, PACKAGED_MODELS)
        )
    return name, {}  # a hub id: transformers fetches it when online


def model_summary(base: Base) -> dict[str, Any]:
    """Parameter count and memory footprint, for reports."""
    n_params = sum(p.numel() for p in base.model.parameters())
    return {
        "source": base.source,
        "kind": base.kind,
        "architecture": base.fingerprint.architecture,
        "quantization": base.quantization,
        "parameters": n_params,
        "memory_footprint_bytes": int(base.model.get_memory_footprint()),
        "device": str(base.device),
    }


def keep_4bit_layout(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights in place for its AVX512-BF16 CPU kernel.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 rewrites each ``Linear4bit`` weight into
    a packed layout at its first no-grad forward in eval mode, and ``state_dict()`` unpacks
    it only "best-effort": after one save, MiniLM's 4-bit embeddings of the same texts moved
    by up to 0.25 (measured), and layers narrower than a quantization block cannot be packed
    at all (``shape '[32, 0]' is invalid``). peftkit saves adapters and checkpoints between
    forwards, so it keeps the plain layout: the same numbers on every CPU, at the cost of
    that kernel's speed (MiniLM, 64 texts: 2.06 s instead of 0.72 s on such a CPU).
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
