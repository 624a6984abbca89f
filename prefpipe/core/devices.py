"""The one device and dtype resolver, for pipelines, scorers and the trainer alike.

    resolve_device("auto")           -> this process's CUDA device (LOCAL_RANK under a launcher), else MPS, else CPU
    resolve_dtype("auto", device)    -> fp16 on a GPU (CUDA or MPS), fp32 on the CPU
"""

from __future__ import annotations

import os

import torch

from prefpipe.core.errors import PrefpipeError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Spellings accepted besides the option names (scorers are built from Python with torch's names too).
_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto`: this process's CUDA device (LOCAL_RANK under a launcher), else MPS, else CPU.

    Anything else is parsed by `torch.device`; a CUDA device on a machine without CUDA stops with a message.
    """
    if isinstance(device, torch.device):
        return device
    if device != "auto":
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise PrefpipeError(f"--device {device}: not a torch device ({e})") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise PrefpipeError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto` (or None): fp16 on a GPU, fp32 on the CPU (half precision there is slow and lossy).

    Accepts the option names (fp32, fp16, bf16), torch's names (float16, bfloat16, half, ...) and torch dtypes.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    name = _ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise PrefpipeError(f"--dtype {dtype}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
