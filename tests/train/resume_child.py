"""The child process of ``test_resume_exact.py``: trains a tiny grid or dual model in a run
folder (resuming what is there, as ``slide-attention train`` does) with one torch thread,
and kills itself with SIGKILL at the moment its plan names.

Usage: ``python resume_child.py KIND COHORT_CSV CLASSES_JSON RUN_DIR PLAN_JSON``

A plan (JSON) is one of:

- ``{}``: train to the end.
- ``{"after": NAME, "target": PREFIX, "call": N}``: SIGKILL right after the N-th call of
  ``train.run_directory``'s ``save_checkpoint``, ``atomic_copy``, ``save_training_state``
  or ``_write_log`` (counting only calls whose target file name starts with PREFIX, when
  given): the moments between the files one epoch writes.
- ``{"cut": N}``: the N-th atomic write (checkpoint, copy, training state, settings or
  log) stops with its temporary file cut to half its size, before the rename, then
  SIGKILL: a kill in the middle of a write.
- ``{"step": N}``: SIGKILL at the N-th optimiser step (mid-epoch).

Every event is printed as a line (``step``, ``epoch``) so the parent can kill it at a
moment of its own choosing too.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch


def _kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install(plan: dict) -> None:
    from napari_slide_attention import files
    from napari_slide_attention.models import checkpoint
    from napari_slide_attention.train import run_directory

    if "after" in plan:
        name, prefix, call = plan["after"], plan.get("target"), plan["call"]
        original = getattr(run_directory, name)
        count = [0]

        def hooked(*args, **kwargs):
            result = original(*args, **kwargs)
            target = args[1] if name == "atomic_copy" else args[0]
            if prefix is None or Path(target).name.startswith(prefix):
                count[0] += 1
                if count[0] == call:
                    _kill()
            return result

        setattr(run_directory, name, hooked)
    elif "cut" in plan:
        # every atomic write renames through files.commit (checkpoint imports it by name)
        original_commit = files.commit
        writes = [0]

        def cut_commit(tmp, path):
            writes[0] += 1
            if writes[0] == plan["cut"]:
                with open(tmp, "r+b") as handle:
                    handle.truncate(os.path.getsize(tmp) // 2)
                _kill()
            original_commit(tmp, path)

        files.commit = checkpoint.commit = cut_commit


def main(kind: str, cohort_csv: str, classes: list[str], run_dir: str, plan: dict) -> int:
    torch.set_num_threads(1)
    from napari_slide_attention.jobs import run_to_end
    from napari_slide_attention.train.cohort import read_cohort

    cohort = read_cohort(cohort_csv, classes)
    if kind == "grid":
        from napari_slide_attention.train.grid import GridTrainSettings, train_grid

        settings = GridTrainSettings.from_dict(
            {
                "epochs": 2,
                "tile_um": 128.0,
                "input_px": 64,
                "n_maps": 4,
                "chunk_tiles": 32,
                "normalise_tiles": 16,
                "augment": True,
                "device": "cpu",
            }
        )
        work = train_grid(cohort, run_dir, settings)
    else:
        from napari_slide_attention.train.dual import DualTrainSettings, train_dual
        from tiny_models import TINY_HARD

        settings = DualTrainSettings.from_dict(
            {
                "epochs": 3,
                "n_tiles": 4,
                "tile_um": 64.0,
                "feature_px": 32,
                "feature_width": 8,
                "soft": {"pool": 4},
                "hard": TINY_HARD,
                "normalise_tiles": 4,
                "device": "cpu",
            }
        )
        work = train_dual(cohort, run_dir, settings)
    _install(plan)
    steps = [0]

    def on_event(event) -> None:
        if event.stage in ("step", "epoch", "resume"):
            print(event.stage, event.done, flush=True)
        if event.stage == "step":
            steps[0] += 1
            if steps[0] == plan.get("step"):
                _kill()

    run_to_end(work, on_event)
    return 0


if __name__ == "__main__":
    kind, cohort_csv, classes, run_dir, plan = sys.argv[1:]
    sys.exit(main(kind, cohort_csv, json.loads(classes), run_dir, json.loads(plan)))
