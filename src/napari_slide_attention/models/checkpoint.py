"""Checkpoints: one safetensors file holding the weights and a JSON header.

A checkpoint is ``<name>.safetensors``: the model's tensors plus, in the safetensors
metadata, the JSON config (model kind, sizes, class names, normalisation) and the
format version. Loading one reads tensors and JSON only; nothing is unpickled. The
header (kind, config, extras) is read from the file's JSON prefix with the standard
library alone, so a file picker on the GUI thread never imports torch. Writes
go to a temporary file in the same directory that is renamed over the target, so a
crash never leaves a half-written checkpoint under the real name.

The optimiser and schedule state for resuming training go into a second file of the
same kind (``save_training_state``).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .registry import model_kind

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "CHECKPOINT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "load_model",
    "load_training_state",
    "read_checkpoint",
    "save_checkpoint",
    "save_training_state",
]

CHECKPOINT_VERSION = 1
_FORMAT = "napari-slide-attention"
# A header larger than this is not one of ours (ours are a few kB).
_MAX_HEADER = 64 << 20


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass
class Checkpoint:
    """A checkpoint as read from disk.

    Attributes:
        path: the file.
        kind: model kind, e.g. "grid-attention".
        config: the model's settings (JSON values).
        tensors: the weights by name (torch tensors; empty for a header read).
        extra: other JSON facts (epoch, metrics, cohort, training settings).
        version: checkpoint format version.
    """

    path: Path
    kind: str
    config: dict[str, Any]
    tensors: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = CHECKPOINT_VERSION


def save_file(tensors: Mapping[str, torch.Tensor], filename: str, metadata: dict[str, str]):
    """safetensors' writer (imported when first used: it imports torch)."""
    from safetensors.torch import save_file as write

    write(tensors, filename, metadata=metadata)


def _atomic_save(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str], path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # safetensors wants contiguous tensors that share no memory
        save_file(
            {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
            tmp,
            metadata=metadata,
        )
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(
    path: str | os.PathLike,
    kind: str,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically; returns its path.

    Args:
        path: target file (``.safetensors`` is appended when missing).
        kind: model kind.
        config: JSON-ready model settings.
        state_dict: the model's tensors.
        extra: JSON-ready facts to keep beside them.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    metadata = {
        "format": _FORMAT,
        "version": str(CHECKPOINT_VERSION),
        "kind": kind,
        "config": json.dumps(dict(config)),
        "extra": json.dumps(dict(extra or {})),
    }
    return _atomic_save(state_dict, metadata, path)


def _read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header's ``__metadata__``, read with the standard library.

    A safetensors file starts with the header's length (8 bytes, little-endian) and the
    header itself (JSON: tensor names, dtypes, shapes, offsets, and ``__metadata__``).
    """
    if not path.is_file():
        raise CheckpointError(path, "no such file" if not path.exists() else "not a file")
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError("the file is shorter than a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(_MAX_HEADER, path.stat().st_size - 8):
                raise ValueError(f"header length {length} does not fit the file")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            path, f"not a readable safetensors checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if metadata.get("format") != _FORMAT:
        raise CheckpointError(
            path,
            "a safetensors file without a napari-slide-attention header (plain weights? "
            "use them as pretrained trunk weights instead)",
        )
    try:
        version = int(metadata.get("version", "0"))
    except ValueError:
        version = -1
    if not 1 <= version <= CHECKPOINT_VERSION:
        raise CheckpointError(
            path,
            f"checkpoint format version {metadata.get('version')!r}; this napari-slide-"
            f"attention reads versions 1 to {CHECKPOINT_VERSION} (upgrade the package)",
        )
    return metadata


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            path, f"not a readable safetensors checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def read_checkpoint(path: str | os.PathLike, *, tensors: bool = True) -> Checkpoint:
    """The checkpoint at ``path``: kind, config, tensors and extras.

    Args:
        path: the checkpoint file.
        tensors: read the weights too; False reads the header alone (kind, config,
            extras: what a file picker shows) and leaves ``tensors`` empty.

    Raises:
        CheckpointError: missing, unreadable, not ours, or from a newer format.
    """
    path = Path(path)
    metadata = _read_metadata(path)
    try:
        config = json.loads(metadata["config"])
        extra = json.loads(metadata.get("extra", "{}"))
        kind = metadata["kind"]
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"damaged header ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(extra, dict) or not isinstance(kind, str):
        raise CheckpointError(
            path, "damaged header (config and extra must be JSON objects, kind a string)"
        )
    weights = _read_tensors(path) if tensors else {}
    return Checkpoint(path, kind, config, weights, extra, int(metadata["version"]))


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[nn.Module, Checkpoint]:
    """Rebuild the model a checkpoint describes, with its weights, in eval mode.

    Raises:
        CheckpointError: unreadable, an unknown kind, or weights that do not fit.
    """
    checkpoint = read_checkpoint(path)
    try:
        kind = model_kind(checkpoint.kind)
    except ValueError as exc:
        raise CheckpointError(path, str(exc)) from None
    try:
        model = kind.build(kind.config_from_dict(checkpoint.config))
        model.load_state_dict(checkpoint.tensors, strict=True)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(path, f"does not fit a {checkpoint.kind} model: {exc}") from exc
    return model.to(device).eval(), checkpoint


# -- training state -----------------------------------------------------------------------
def save_training_state(
    path: str | os.PathLike, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> Path:
    """Write the optimiser's state and the loop's JSON state atomically (for resuming)."""
    import torch

    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in opt["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    metadata = {
        "format": _FORMAT,
        "version": str(CHECKPOINT_VERSION),
        "kind": "training-state",
        "config": json.dumps({"param_groups": opt["param_groups"], "scalars": scalars}),
        "extra": json.dumps(dict(state)),
    }
    if not tensors:  # safetensors needs at least one tensor to write a header we can read
        tensors["empty"] = torch.zeros(0)
    return _atomic_save(tensors, metadata, Path(path))


def load_training_state(
    path: str | os.PathLike, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore the optimiser from ``save_training_state``'s file; returns the loop state."""
    checkpoint = read_checkpoint(path)
    if checkpoint.kind != "training-state":
        raise CheckpointError(path, f"holds a {checkpoint.kind} model, not a training state")
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in checkpoint.tensors.items():
        if name == "empty":
            continue
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in checkpoint.config.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = checkpoint.config["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(path, f"does not fit this optimiser: {exc}") from exc
    return checkpoint.extra
