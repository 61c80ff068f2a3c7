"""Cancelling at any point: a stopped prediction leaves no result behind, never a partial
one, and the result a user saved before stays as it was (issue 15 item 5).

The stop points are drawn by the test from every event a full run makes, so the stop
lands in tissue detection, between tile batches, between pieces and on the last event.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from napari_slide_attention.cli import main
from napari_slide_attention.jobs import Job, Stopped, run_to_end

CLASSES = ("normal", "low-grade", "high-grade", "carcinoma")
STOPS_PER_KIND = 4


def _grid():
    from napari_slide_attention.models.grid_attention import GridAttention, GridAttentionConfig

    config = GridAttentionConfig(classes=CLASSES, n_maps=2, tile_um=128.0, input_px=32)
    return config, GridAttention(config)


def _sliding_window():
    from napari_slide_attention.models.sliding_window import CropClassifier, SlidingWindowConfig

    config = SlidingWindowConfig(classes=CLASSES, crop_um=128.0, input_px=32)
    return config, CropClassifier(config)


def _dual():
    from napari_slide_attention.models.dual_attention import DualAttention, DualAttentionConfig
    from tiny_models import TINY_HARD

    config = DualAttentionConfig(
        classes=CLASSES, tile_um=128.0, n_tiles=4, feature_px=64, hard=TINY_HARD
    )
    return config, DualAttention(config)


@pytest.fixture(scope="module", params=["grid", "sliding-window", "dual"])
def model(request, tmp_path_factory):
    """An untrained checkpoint of each kind (what it predicts does not matter here)."""
    import torch

    from napari_slide_attention.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config, module = {"grid": _grid, "sliding-window": _sliding_window, "dual": _dual}[
        request.param
    ]()
    path = tmp_path_factory.mktemp(f"cancel-{request.param}") / "model"
    return save_checkpoint(path, config.kind, config.to_dict(), module.state_dict())


@pytest.fixture(scope="module")
def slide(tiny_cohort):
    return tiny_cohort.split("test")[-1].slide


def _stop_points(n_events: int, seed: int) -> list[int]:
    """Event numbers (from 1) to stop at: the first, the last, and random ones between."""
    rng = np.random.default_rng(seed)
    middle = rng.choice(np.arange(2, n_events), size=min(STOPS_PER_KIND - 2, n_events - 2))
    return sorted({1, n_events, *(int(k) for k in middle)})


def _options(model) -> dict:
    from napari_slide_attention.inference import predict_options
    from napari_slide_attention.models.checkpoint import read_checkpoint

    kind = read_checkpoint(model, tensors=False).kind
    return {"device": "cpu", **({"seed": 0} if "seed" in predict_options(kind) else {})}


def test_a_prediction_stopped_at_any_event_raises_stopped_and_then_runs_whole(model, slide):
    from napari_slide_attention.inference import predict

    events: list = []
    whole = run_to_end(predict(model, slide, **_options(model)), events.append)
    for k in _stop_points(len(events), seed=len(events)):
        job = Job(predict(model, slide, **_options(model)))
        seen = []

        def stop_at_k(event, seen=seen, job=job, k=k):
            seen.append(event)
            if len(seen) == k:
                job.stop("cancelled")

        with pytest.raises(Stopped, match="cancelled"):
            job.run(stop_at_k)
        assert len(seen) == k  # nothing ran past the stop
    again = run_to_end(predict(model, slide, **_options(model)))
    np.testing.assert_allclose(again.probabilities, whole.probabilities, atol=1e-6)


def test_ctrl_c_at_any_event_of_predict_leaves_the_saved_result_as_it_was(
    model, slide, tmp_path, monkeypatch, capsys
):
    import napari_slide_attention.cli.models as cli_models

    out = tmp_path / "result"
    argv = ["predict", "--model", str(model), "--slide", str(slide), "--device", "cpu"]
    argv += ["--out", str(out)]
    counted = []

    class CountingPrinter:
        def __init__(self, quiet=False):
            pass

        def __call__(self, event):
            counted.append(event)

        def line(self, text):
            pass

    monkeypatch.setattr(cli_models, "ProgressPrinter", CountingPrinter)
    assert main([*argv, "--quiet"]) == 0  # a whole run, saved: the result to keep
    saved = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert json.loads((out / "result.json").read_text())["predicted"] in range(len(CLASSES))
    n_events = len(counted)
    for k in _stop_points(n_events, seed=n_events + 1):
        seen = []

        class CtrlCAtK(CountingPrinter):
            def __call__(self, event, seen=seen, k=k):
                seen.append(event)
                if len(seen) == k:  # as if the user pressed Ctrl-C here
                    os.kill(os.getpid(), signal.SIGINT)

        monkeypatch.setattr(cli_models, "ProgressPrinter", CtrlCAtK)
        capsys.readouterr()
        assert main([*argv, "--quiet"]) == 130, f"stopped at event {k} of {n_events}"
        assert "interrupted" in capsys.readouterr().err
        # the result saved before is the one there, byte for byte, and nothing beside it
        now = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert now == saved
        assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]
