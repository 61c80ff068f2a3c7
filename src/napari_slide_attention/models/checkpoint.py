"""Checkpoints: one safetensors file holding the weights and a JSON header.

A checkpoint is ``<name>.safetensors``: the model's tensors plus, in the safetensors
metadata, the JSON config (model kind, sizes, class names, normalisation) and the
format version. Loading one reads tensors and JSON only; nothing is unpickled. The
header (kind, config, extras, and the table of tensor names, types and shapes) is read
from the file's JSON prefix with the standard library alone, so a file picker on the GUI
thread never imports torch. Writes go to a temporary file in the same directory that is
renamed over the target, so a crash never leaves a half-written checkpoint under the
real name; the file gets the permissions a plain ``open`` would give it.

Before any tensor is used, ``load_model`` checks the header against what it describes:
the config through the kind's config class (types and sane ranges of every setting),
then the tensor table against the state dict of the model that config builds (built on
torch's meta device, so a header asking for a huge model allocates nothing). A header
that does not fit is a ``CheckpointError`` naming the file and the setting or tensor.

The training state for resuming is ``training_state.py``'s: a file of the same kind.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..files import commit, temp_sibling
from .registry import KINDS, model_kind

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .registry import ModelKind

__all__ = [
    "CHECKPOINT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "check_fits",
    "load_model",
    "model_config",
    "read_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_VERSION = 1
_FORMAT = "napari-slide-attention"
# A header larger than this is not one of ours (ours are a few kB).
_MAX_HEADER = 64 << 20
# safetensors' dtype names
_DTYPES = frozenset(
    ["BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64"]
)


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
        layout: the header's tensor table: name -> (safetensors dtype, shape).
    """

    path: Path
    kind: str
    config: dict[str, Any]
    tensors: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = CHECKPOINT_VERSION
    layout: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)


# -- writing ------------------------------------------------------------------------------
def save_file(tensors: Mapping[str, torch.Tensor], filename: str, metadata: dict[str, str]):
    """safetensors' writer (imported when first used: it imports torch)."""
    from safetensors.torch import save_file as write

    write(tensors, filename, metadata=metadata)


def _atomic_save(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str], path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    mode = tmp.stat().st_mode & 0o777
    try:
        # safetensors wants contiguous tensors that share no memory
        save_file(
            {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
            str(tmp),
            metadata=metadata,
        )
        os.chmod(tmp, mode)  # safetensors writes its file anew, as 0600
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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


# -- reading the header -------------------------------------------------------------------
def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """The safetensors header's ``__metadata__`` and tensor table, read with the standard
    library.

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
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not a JSON object")
        layout = {name: _table_entry(name, entry) for name, entry in header.items()}
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
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
    except (TypeError, ValueError):
        version = -1
    if not 1 <= version <= CHECKPOINT_VERSION:
        raise CheckpointError(
            path,
            f"checkpoint format version {str(metadata.get('version'))[:20]!r}; this napari-"
            f"slide-attention reads versions 1 to {CHECKPOINT_VERSION} (upgrade the package)",
        )
    return metadata, layout


def _table_entry(name: str, entry: Any) -> tuple[str, tuple[int, ...]]:
    """One tensor's (dtype, shape) from the header's table; ValueError if malformed."""
    if not isinstance(entry, dict):
        raise ValueError(f"tensor {name!r} has no dtype and shape")
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if dtype not in _DTYPES:
        raise ValueError(f"tensor {name!r} has an unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError(f"tensor {name!r} has a malformed shape")
    return dtype, tuple(shape)


def _check_classes(path: Path, config: dict[str, Any]) -> None:
    """The class names of a known kind's config, checked without torch (what a file
    picker shows): a list of at least 2 distinct, non-empty strings."""
    classes = config.get("classes")
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) and c.strip() for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise CheckpointError(
            path,
            "config: classes must be a list of at least 2 distinct, non-empty names, got "
            f"{json.dumps(classes)[:60]}",
        )


def read_checkpoint(path: str | os.PathLike, *, tensors: bool = True) -> Checkpoint:
    """The checkpoint at ``path``: kind, config, tensors and extras.

    Args:
        path: the checkpoint file.
        tensors: read the weights too; False reads the header alone (kind, config,
            extras and the tensor table: what a file picker shows) and leaves
            ``tensors`` empty.

    Raises:
        CheckpointError: missing, unreadable, not ours, from a newer format, or a
            header whose parts are not of their kinds (config and extra JSON objects,
            kind a string; a known kind's class names a list of distinct names).
    """
    path = Path(path)
    metadata, layout = _read_header(path)
    try:
        config = json.loads(metadata["config"])
        extra = json.loads(metadata.get("extra", "{}"))
        kind = metadata["kind"]
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise CheckpointError(path, f"damaged header ({type(exc).__name__}: {exc})") from exc
    for name, value, wanted in (
        ("config", config, dict),
        ("extra", extra, dict),
        ("kind", kind, str),
    ):
        if not isinstance(value, wanted):
            raise CheckpointError(
                path,
                f"damaged header ({name} must be a JSON {'object' if wanted is dict else 'string'}"
                f", got {json.dumps(value)[:40]})",
            )
    if kind in KINDS:
        _check_classes(path, config)
    weights = _read_tensors(path) if tensors else {}
    return Checkpoint(path, kind, config, weights, extra, int(metadata["version"]), layout)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(
            path, f"not a readable safetensors checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


# -- checking a header against a model ----------------------------------------------------
def model_config(checkpoint: Checkpoint) -> tuple[ModelKind, Any]:
    """The checkpoint's kind and its config object, every setting checked.

    Raises:
        CheckpointError: an unknown kind, or a config its class refuses (naming the
            setting).
    """
    try:
        kind = model_kind(checkpoint.kind)
    except ValueError as exc:
        raise CheckpointError(checkpoint.path, str(exc)) from None
    try:
        return kind, kind.config_from_dict(checkpoint.config)
    except (ValueError, TypeError, OverflowError) as exc:
        raise CheckpointError(checkpoint.path, f"config: {exc}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    import torch

    names = {
        torch.bool: "BOOL",
        torch.uint8: "U8",
        torch.int8: "I8",
        torch.int16: "I16",
        torch.int32: "I32",
        torch.int64: "I64",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float32: "F32",
        torch.float64: "F64",
    }
    return names.get(dtype, str(dtype))


def _settings_sized(config: Any, size: int, where: str = "") -> list[str]:
    """The (nested) settings of a JSON config whose value is, or lists, ``size``."""
    found = []
    if isinstance(config, dict):
        classes = config.get("classes")
        if isinstance(classes, list) and len(classes) == size:
            found.append(f"classes: {size} names")
        for key, value in config.items():
            if key in ("mean", "std", "classes", "risk_order", "thresholds", "min_counts"):
                continue
            found += _settings_sized(value, size, f"{where}{key}.")
    elif isinstance(config, list) and any(v == size for v in config if isinstance(v, int)):
        found.append(f"{where.rstrip('.')}={json.dumps(config)}")
    elif isinstance(config, int) and not isinstance(config, bool) and config == size:
        found.append(f"{where.rstrip('.')}={config}")
    return found


def check_fits(
    checkpoint: Checkpoint, expected: Mapping[str, Any], config: dict[str, Any] | None = None
) -> None:
    """Check the checkpoint's tensor table against a model's state dict: the same names,
    shapes and dtypes (nothing is read or loaded).

    Args:
        checkpoint: the checkpoint (its ``layout``; a header read is enough).
        expected: the state dict the tensors must fill (tensors on any device, meta too).
        config: the JSON config the model was built from, to name the settings behind a
            shape that differs (default: the checkpoint's).

    Raises:
        CheckpointError: naming the first missing, unexpected or ill-fitting tensor.
    """
    layout, path = checkpoint.layout, checkpoint.path
    config = checkpoint.config if config is None else config
    missing = [name for name in expected if name not in layout]
    unexpected = [name for name in layout if name not in expected]
    fits = f"does not fit a {checkpoint.kind} model"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(path, f"{fits} of its config: {' and '.join(parts)}")
    for name, tensor in expected.items():
        dtype, shape = layout[name]
        want_shape, want_dtype = tuple(tensor.shape), _dtype_name(tensor.dtype)
        if shape != want_shape:
            differing = [w for h, w in zip(shape, want_shape, strict=False) if h != w]
            settings = _settings_sized(config, differing[0]) if differing else []
            hint = f" ({', '.join(settings[:3])})" if settings else ""
            raise CheckpointError(
                path,
                f"{fits}: tensor {name} has shape {list(shape)}, its config{hint} builds "
                f"{list(want_shape)}",
            )
        if dtype != want_dtype:
            raise CheckpointError(
                path, f"{fits}: tensor {name} is {dtype}, the model's is {want_dtype}"
            )


def _skeleton(kind: ModelKind, config: Any) -> nn.Module:
    """The model a config builds, on the meta device (shapes only, no memory)."""
    import torch

    with torch.device("meta"):
        return kind.build(config)


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[nn.Module, Checkpoint]:
    """Rebuild the model a checkpoint describes, with its weights, in eval mode.

    The header is checked first (``model_config``, then ``check_fits`` against the model
    built on the meta device); only then is the model built and are tensors read.

    Raises:
        CheckpointError: unreadable, an unknown kind, a setting out of its type or range,
            or weights that do not fit.
    """
    header = read_checkpoint(path, tensors=False)
    kind, config = model_config(header)
    check_fits(header, _skeleton(kind, config).state_dict())
    _, config = model_config(header)  # a fresh one: a model may change its own
    model = kind.build(config)
    tensors = _read_tensors(header.path)
    try:
        model.load_state_dict(tensors, strict=True)
    except (ValueError, TypeError, RuntimeError) as exc:  # the file changed meanwhile
        raise CheckpointError(path, f"does not fit a {header.kind} model: {exc}") from exc
    checkpoint = Checkpoint(
        header.path,
        header.kind,
        header.config,
        tensors,
        header.extra,
        header.version,
        header.layout,
    )
    return model.to(device).eval(), checkpoint
