"""Training killed with SIGKILL at any moment resumes to exactly what an uninterrupted run
gives: the same weights, optimiser state, best checkpoint and log (grid and dual).

A child process (``resume_child.py``) trains a tiny model with one torch thread; the test
kills it again and again, at moments it picks: mid-epoch, between the files one epoch
writes (the epoch's checkpoint, ``last``, ``best``, the training state, the log), in the
middle of a write, and at random moments chosen here; after each kill ``last`` and
``best`` must be complete files. Then it lets the run finish and compares with an
uninterrupted run of the same seed. CPU, one thread: the comparison is exact.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from napari_slide_attention.files import is_temporary
from napari_slide_attention.models.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("resume_child.py")
TESTS = Path(__file__).parents[1]
# A child that neither finishes nor is killed in this time hangs (generous: a whole tiny
# run takes about a minute on a loaded 2-core machine).
CHILD_TIMEOUT_S = 600

BETWEEN_FILES = [
    {"after": "save_checkpoint", "call": 1},  # the epoch's checkpoint, not yet last
    {"after": "atomic_copy", "target": "last", "call": 1},  # last, not the state (issue 15)
    {"after": "save_training_state", "call": 1},  # the state, not the log files
    {"after": "atomic_copy", "target": "best", "call": 1},  # best, not the state
]
PLANS = {
    "grid": [
        {"step": 2},
        BETWEEN_FILES[1],
        {"cut": 3},
        BETWEEN_FILES[2],
        {"random_after_steps": 1},
        BETWEEN_FILES[0],
        {"cut": 2},
        BETWEEN_FILES[3],
        {"random_after_steps": 2},
    ],
    "dual": [  # one step an epoch, and quick epochs: random moments early in a run
        {"random_after_steps": 1},
        BETWEEN_FILES[1],
        {"cut": 3},
        BETWEEN_FILES[2],
        {"random_after_steps": 1},
        BETWEEN_FILES[0],
        {"step": 1},
        BETWEEN_FILES[3],
    ],
}


def _run(kind: str, cohort, run_dir: Path, plan: dict, rng: random.Random) -> int:
    """Run the child to its end or its kill; returns its exit status (-9: killed)."""
    kills = {k: v for k, v in plan.items() if k != "random_after_steps"}
    child = _start_child(kind, cohort, run_dir, kills, stdout=subprocess.PIPE, text=True)
    timer = threading.Timer(CHILD_TIMEOUT_S, child.kill)
    timer.start()
    try:
        steps = 0
        for line in child.stdout:
            steps += line.startswith("step")
            if steps == plan.get("random_after_steps"):
                time.sleep(rng.uniform(0.0, 1.0))  # a moment in the step's epoch or the next
                child.send_signal(signal.SIGKILL)
                break
        code = child.wait()
    finally:
        timer.cancel()
        child.stdout.close()
    assert timer.is_alive() or code in (0, -signal.SIGKILL), "the child hung"
    return code


def _start_child(kind: str, cohort, run_dir: Path, kills: dict, **popen) -> subprocess.Popen:
    """The training child (``resume_child.py``) on one thread, with its kill plan."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    args = [sys.executable, str(CHILD), kind, str(cohort.path)]
    args += [json.dumps(list(cohort.classes)), str(run_dir), json.dumps(kills)]
    return subprocess.Popen(args, env=env, **popen)


def _start_reference(kind: str, cohort, run_dir: Path) -> subprocess.Popen:
    return _start_child(kind, cohort, run_dir, {}, stdout=subprocess.DEVNULL)


def _complete(path: Path) -> None:
    """``path``, where it exists, is a whole checkpoint: every tensor reads."""
    if path.exists():
        checkpoint = read_checkpoint(path)
        assert checkpoint.tensors and isinstance(checkpoint.extra.get("epoch"), int), path


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return _without_seconds(list(csv.DictReader(handle)))


def _extra(path: Path) -> dict:
    """A checkpoint's extras but the epoch's time."""
    extra = read_checkpoint(path, tensors=False).extra
    return {**extra, "metrics": _without_seconds([extra["metrics"]])[0]}


def _assert_same_tensors(a: Path, b: Path) -> None:
    ours, theirs = read_checkpoint(a).tensors, read_checkpoint(b).tensors
    assert ours.keys() == theirs.keys(), a.name
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), f"{a.name}: {name}"


@pytest.mark.parametrize("kind", ["grid", "dual"])
def test_a_run_killed_at_any_moment_resumes_to_the_uninterrupted_weights(
    kind, tiny_cohort, tmp_path
):
    seed = random.randrange(2**32)
    print(f"random kill moments from seed {seed}")
    rng = random.Random(seed)
    reference = _start_reference(kind, tiny_cohort, tmp_path / "whole")  # alongside
    run = tmp_path / "killed"

    kills, code, runs = 0, None, []
    for plan in PLANS[kind]:
        code = _run(kind, tiny_cohort, run, plan, rng)
        runs.append((plan, code))
        if code == 0:
            break
        assert code == -signal.SIGKILL, plan
        kills += 1
        for name in ("last.safetensors", "best.safetensors"):  # never half a file
            _complete(run / name)
    for _ in range(3):  # resume until done
        if code == 0:
            break
        code = _run(kind, tiny_cohort, run, {}, rng)
    assert code == 0
    print(f"{kind}: {kills} kills, then resumed to the end")
    assert kills >= 5, f"only {kills} kills landed: {runs}"
    assert reference.wait(timeout=CHILD_TIMEOUT_S) == 0
    whole = tmp_path / "whole"

    epochs = sorted(p.name for p in (whole / "checkpoints").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == epochs
    for name in ("last", "best", "training-state"):
        _assert_same_tensors(run / f"{name}.safetensors", whole / f"{name}.safetensors")
    for name in epochs:
        _assert_same_tensors(run / "checkpoints" / name, whole / "checkpoints" / name)
    assert _extra(run / "best.safetensors") == _extra(whole / "best.safetensors")
    ours = read_checkpoint(run / "training-state.safetensors", tensors=False).extra
    theirs = read_checkpoint(whole / "training-state.safetensors", tensors=False).extra
    for key in ("epoch", "best_epoch", "best_score", "model_config"):
        assert ours[key] == theirs[key], key
    assert _without_seconds(ours["log"]) == _without_seconds(theirs["log"])
    log = json.loads((run / "log.json").read_text())
    assert _without_seconds(log) == _without_seconds(json.loads((whole / "log.json").read_text()))
    assert [row["epoch"] for row in log] == list(range(len(epochs)))
    assert _csv_rows(run / "log.csv") == _csv_rows(whole / "log.csv")

    # nothing an interrupted write left behind; every checkpoint file of one mode, that of
    # a file opened the ordinary way
    files = [p for p in run.rglob("*") if p.is_file()]
    assert not [p for p in files if is_temporary(p) or p.name.endswith(".tmp")]
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    modes = {p.stat().st_mode & 0o777 for p in files if p.suffix == ".safetensors"}
    assert modes == {plain.stat().st_mode & 0o777}
