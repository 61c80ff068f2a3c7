"""Where models run and in what precision: one policy for inference, training and
validation alike.

``resolve_device("auto")`` picks CUDA when torch sees a GPU; ``default_amp(device)`` is
the one autocast default (on CUDA, and on CPUs that compute bfloat16 natively), and
``Autocast`` applies it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["Autocast", "cpu_bf16_supported", "default_amp", "model_device", "resolve_device"]

DEVICE_KINDS = ("cpu", "cuda")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """ "auto" -> CUDA when available, else CPU; "cpu", "cuda", "cuda:N" as given.

    Raises:
        ValueError: a device this tool does not run on, or CUDA asked for but absent.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {str(device)!r}; use auto, cpu or cuda[:N]") from exc
    if device.type not in DEVICE_KINDS:
        raise ValueError(f"device {str(device)!r} is not supported here; use auto, cpu or cuda[:N]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} asked for, but torch sees "
                f"{torch.cuda.device_count()} CUDA GPU(s)"
            )
    return device


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16
    autocast speeds things up instead of emulating."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_amp(device: torch.device | str) -> bool:
    """The one autocast default: on CUDA, and on CPUs with native bf16."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and cpu_bf16_supported())


class Autocast:
    """Mixed precision where it helps: fp16/bf16 on CUDA, bf16 on CPUs.

    Args:
        device: where the model runs.
        amp: on or off; None = ``default_amp(device)``.
    """

    def __init__(self, device: torch.device, amp: bool | None):
        device = torch.device(device)
        self.enabled = default_amp(device) if amp is None else bool(amp)
        if device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = torch.bfloat16
        self.device_type = device.type

    def __call__(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def model_device(model: nn.Module) -> torch.device:
    """The device a model's parameters are on."""
    return next(model.parameters()).device
