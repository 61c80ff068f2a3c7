"""The training state: what resuming a run needs, in one checkpoint-like file.

``save_training_state`` writes the optimiser's state (its tensors as ``state.<i>.<key>``,
its plain numbers and parameter groups as JSON), the model's weights (``model.<name>``)
and the loop's JSON state (epoch, best score, log rows) into one safetensors file with a
checkpoint's header (kind "training-state"), atomically: weights and optimiser state are
always of one moment. ``load_training_state`` checks all of it against the optimiser and
model before it restores anything. Files written before the weights went in hold the
optimiser alone (``holds_weights`` tells them apart).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint, CheckpointError, check_fits, read_checkpoint, save_checkpoint

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["KIND", "holds_weights", "load_training_state", "save_training_state"]

KIND = "training-state"
# The model's tensors are kept under this prefix.
_WEIGHTS = "model."


def save_training_state(
    path: str | os.PathLike,
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the optimiser's state, the model's weights and the loop's JSON state
    atomically, as one file (for resuming).

    Args:
        path: the file.
        optimizer: the optimiser.
        state: JSON-ready loop state (epoch, best score, log, ...).
        weights: the model's state dict, kept with the optimiser's state so that the two
            are always of one moment.
    """
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
    for name, value in (weights or {}).items():
        tensors[_WEIGHTS + name] = value
    if not tensors:  # safetensors needs at least one tensor to write a header we can read
        tensors["empty"] = torch.zeros(0)
    config = {"param_groups": opt["param_groups"], "scalars": scalars}
    return save_checkpoint(path, KIND, config, tensors, state)


def holds_weights(checkpoint: Checkpoint) -> bool:
    """Whether a training state (a header read is enough) keeps the model's weights."""
    return any(name.startswith(_WEIGHTS) for name in checkpoint.layout)


def _optimizer_state(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser state dict a training state holds, checked against ``optimizer``'s
    parameters (groups, sizes and the shapes of per-parameter tensors)."""
    path = checkpoint.path
    try:
        groups = checkpoint.config["param_groups"]
        scalars = checkpoint.config.get("scalars", {})
        if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
        ):
            raise ValueError("param_groups must be a list of groups with params")
        if not isinstance(scalars, dict) or not all(isinstance(v, dict) for v in scalars.values()):
            raise ValueError("scalars must map parameter indices to objects")
        state: dict[int, dict[str, Any]] = {}
        for name, tensor in checkpoint.tensors.items():
            if name == "empty" or name.startswith(_WEIGHTS):
                continue
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
        for index, values in scalars.items():
            state.setdefault(int(index), {}).update(values)
        for group in groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(path, f"damaged training state ({exc})") from None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in state.items():
        if not 0 <= index < len(params):
            raise CheckpointError(path, f"does not fit this optimiser: no parameter {index}")
        for key, value in values.items():
            shape = getattr(value, "shape", ())
            if key != "step" and len(shape) and tuple(shape) != tuple(params[index].shape):
                raise CheckpointError(
                    path,
                    f"does not fit this optimiser: {key} of parameter {index} has shape "
                    f"{list(shape)}, the parameter {list(params[index].shape)}",
                )
    return {"state": state, "param_groups": groups}


def load_training_state(
    path: str | os.PathLike,
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Restore the optimiser (and, given ``model``, the weights) from
    ``save_training_state``'s file; returns the loop state.

    Everything is checked before anything is restored.

    Raises:
        CheckpointError: not a training state, damaged, not of this optimiser, or
            (given ``model``) without weights or with weights that do not fit it.
    """
    header = read_checkpoint(path, tensors=False)
    if header.kind != KIND:
        raise CheckpointError(path, f"holds a {header.kind} model, not a training state")
    if model is not None:
        if not holds_weights(header):
            raise CheckpointError(path, "holds no model weights (written by an older version)")
        config = header.extra.get("model_config")
        config = config if isinstance(config, dict) else {}
        weights_only = Checkpoint(
            header.path,
            str(config.get("kind", "saved")),
            config,
            {},
            layout={
                k[len(_WEIGHTS) :]: v for k, v in header.layout.items() if k.startswith(_WEIGHTS)
            },
        )
        check_fits(weights_only, model.state_dict())
    checkpoint = read_checkpoint(path)
    opt_state = _optimizer_state(checkpoint, optimizer)
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(path, f"does not fit this optimiser: {exc}") from exc
    if model is not None:
        weights = {
            k[len(_WEIGHTS) :]: v for k, v in checkpoint.tensors.items() if k.startswith(_WEIGHTS)
        }
        try:
            model.load_state_dict(weights, strict=True)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(path, f"its weights do not fit the model: {exc}") from exc
    return checkpoint.extra
