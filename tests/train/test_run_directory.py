"""RunDirectory: an epoch counts once its training state (weights, optimiser state, epoch,
best epoch, log) is in place; a run stopped between the files an epoch writes resumes
from the last complete state with ``last``, ``best`` and the log put back to it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from napari_slide_attention.models.checkpoint import CheckpointError, read_checkpoint
from napari_slide_attention.models.training_state import save_training_state
from napari_slide_attention.train import run_directory
from napari_slide_attention.train.run_directory import RunDirectory

RECORD = {"settings": {"epochs": 5}, "classes": ["a", "b"]}


class _Killed(Exception):
    """Where a kill would have stopped the process."""


class _Config:
    kind = "toy"

    def to_dict(self):
        return {"kind": "toy", "classes": ["a", "b"]}


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Config()
        self.layer = nn.Linear(3, 2)


def _train_epoch(model, optimizer, epoch):
    torch.manual_seed(epoch)
    optimizer.zero_grad()
    model.layer(torch.randn(4, 3)).square().mean().backward()
    optimizer.step()


def _fresh():
    torch.manual_seed(0)
    model = _Toy()
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def _run(path, epochs, scores=(3.0, 1.0, 2.0, 0.5)):
    """Epochs 0..epochs-1 through ``save_epoch``; returns the model and optimiser."""
    model, optimizer = _fresh()
    run = RunDirectory(path, RECORD, resume=False)
    (run.path / "checkpoints").mkdir(exist_ok=True)
    for epoch in range(epochs):
        _train_epoch(model, optimizer, epoch)
        run.save_epoch(
            epoch, {"epoch": epoch, "train_loss": 1.0}, scores[epoch], model, optimizer, {}
        )
    return model, optimizer


def _restored(path):
    model, optimizer = _fresh()
    run = RunDirectory(path, RECORD, resume=True)
    events = list(run.restore(model, optimizer, 5))
    return run, model, optimizer, events


def _same(a: nn.Module, b: nn.Module) -> bool:
    ours, theirs = a.state_dict(), b.state_dict()
    return all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("stop_before", ["atomic_copy", "save_training_state", "_write_log"])
def test_a_run_stopped_between_an_epochs_files_resumes_from_its_last_complete_state(
    tmp_path, monkeypatch, stop_before
):
    # epochs 0 and 1 complete (best: epoch 0, score 3); epoch 2 (score 2) is cut short
    model, optimizer = _run(tmp_path, 2)
    done = _Toy()
    done.load_state_dict(model.state_dict())
    run = RunDirectory(tmp_path, RECORD, resume=True)
    list(run.restore(*_fresh(), 5))
    calls = []
    real = getattr(run_directory, stop_before)

    def stop(*args, **kwargs):
        calls.append(args)
        if stop_before != "atomic_copy" or len(calls) == 2:  # atomic_copy: after last
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(run_directory, stop_before, stop)
    _train_epoch(model, optimizer, 2)
    with pytest.raises(_Killed):
        run.save_epoch(2, {"epoch": 2, "train_loss": 1.0}, 4.0, model, optimizer, {})
    monkeypatch.undo()

    run, resumed, _, events = _restored(tmp_path)
    state_written = stop_before == "_write_log"
    assert run.start_epoch == (3 if state_written else 2)
    assert [e.stage for e in events] == ["resume"]
    assert _same(resumed, model if state_written else done)
    assert [r["epoch"] for r in run.log] == list(range(run.start_epoch))
    log = json.loads((tmp_path / "log.json").read_text())
    assert [r["epoch"] for r in log] == list(range(run.start_epoch))  # put back too
    assert read_checkpoint(tmp_path / "last.safetensors").extra["epoch"] == run.start_epoch - 1
    best_epoch = 2 if state_written else 0
    assert run.best_epoch == best_epoch
    assert read_checkpoint(tmp_path / "best.safetensors").extra["epoch"] == best_epoch


def test_an_older_training_state_takes_the_weights_of_its_own_epoch(tmp_path):
    _, optimizer = _run(tmp_path, 2)
    last = (tmp_path / "last.safetensors").read_bytes()  # epoch 1
    epoch_0 = read_checkpoint(tmp_path / "checkpoints" / "epoch-0001.safetensors")
    # as older versions wrote it: the optimiser alone, here of epoch 0 while last is epoch 1
    save_training_state(tmp_path / "training-state.safetensors", optimizer, {"epoch": 0})
    (tmp_path / "log.json").write_text(json.dumps([{"epoch": 0}, {"epoch": 1}]))
    run, resumed, _, _ = _restored(tmp_path)
    assert run.start_epoch == 1 and [r["epoch"] for r in run.log] == [0]
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, epoch_0.tensors[name])

    assert read_checkpoint(tmp_path / "last.safetensors").extra["epoch"] == 0  # put back
    (tmp_path / "last.safetensors").write_bytes(last)
    (tmp_path / "checkpoints" / "epoch-0001.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"after epoch 1, but neither.*--no-resume"):
        _restored(tmp_path)


@pytest.mark.parametrize("epoch", ["x", -1, None, 1.5])
def test_a_damaged_training_state_is_refused_naming_it(tmp_path, epoch):
    model, optimizer = _run(tmp_path, 1)
    state = tmp_path / "training-state.safetensors"
    save_training_state(state, optimizer, {"epoch": epoch}, model.state_dict())
    with pytest.raises(CheckpointError, match="damaged training state") as info:
        _restored(tmp_path)
    assert str(info.value).startswith(f"{state}: ")


def test_a_training_state_of_another_model_is_refused_before_anything_is_restored(tmp_path):
    _run(tmp_path, 1)
    other = nn.Linear(5, 2)
    save_training_state(
        tmp_path / "training-state.safetensors",
        torch.optim.Adam(other.parameters()),
        {"epoch": 0},
        {"layer.weight": other.weight, "layer.bias": other.bias},
    )
    model, optimizer = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = RunDirectory(tmp_path, RECORD, resume=True)
    with pytest.raises(CheckpointError, match=r"tensor layer\.weight has shape \[2, 5\]"):
        list(run.restore(model, optimizer, 5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_what_interrupted_writes_left_is_removed(tmp_path):
    _run(tmp_path, 1)
    left = [
        tmp_path / ".last.safetensors.0a1b2c3d.tmp",
        tmp_path / "checkpoints" / ".epoch-0002.safetensors.deadbeef.tmp",
        tmp_path / "log.json.tmp",
    ]
    kept = tmp_path / "notes.tmp.txt"
    for path in [*left, kept]:
        path.write_bytes(b"half")
    RunDirectory(tmp_path, RECORD, resume=True)
    assert not any(p.exists() for p in left) and kept.exists()
