"""Whole-slide inference: events, pieces on one slide-wide grid, aggregation, saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_slide_attention.inference import AGGREGATIONS, aggregate, predict
from napari_slide_attention.jobs import Job, Stopped, run_to_end
from napari_slide_attention.models.checkpoint import load_model
from napari_slide_attention.results import SlideResult
from napari_slide_attention.slide.reader import open_slide
from napari_slide_attention.slide.sampling import slide_pieces, tile_edge_px


def test_highest_risk_rule_and_the_other_aggregations():
    pieces = [np.array([0.7, 0.1, 0.2]), np.array([0.2, 0.5, 0.3]), np.array([0.3, 0.3, 0.4])]
    probs, cls = aggregate(pieces, "highest-risk", (0, 1, 2))
    assert cls == 2 and np.allclose(probs, pieces[2])
    probs, cls = aggregate(pieces, "highest-risk", (0, 2, 1))  # class 1 riskiest
    assert cls == 1 and np.allclose(probs, pieces[1])
    probs, cls = aggregate(pieces, "mean", (0, 1, 2))
    assert cls == 0 and np.allclose(probs, np.mean(pieces, 0))
    probs, cls = aggregate(pieces, "max", (0, 1, 2))
    assert np.isclose(probs.sum(), 1) and cls == 0
    assert set(AGGREGATIONS) == {"highest-risk", "mean", "max"}
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(pieces, "vote", (0, 1, 2))


def test_predict_slide_gives_every_piece_on_the_slide_grid(tiny_cohort, tiny_grid_model, tmp_path):
    entry = tiny_cohort.split("test")[3]
    events = []
    result = run_to_end(predict(tiny_grid_model, entry.slide, device="cpu"), events.append)
    assert [e.stage for e in events][:2] == ["tissue", "tissue"]
    piece_events = [e for e in events if e.stage == "piece"]
    assert len(piece_events) == len(result.pieces) and piece_events[-1].done == len(result.pieces)
    assert piece_events[0].data["piece"] is result.pieces[0]  # arrives as it is computed
    model, _ = load_model(tiny_grid_model)
    with open_slide(entry.slide) as slide:
        samples = slide_pieces(slide, tile_edge_px(slide, model.config.tile_um))
    assert [p.box for p in result.pieces] == [s.box for s in samples]
    for piece, sample in zip(result.pieces, samples, strict=True):
        assert piece.maps.shape == (4, *sample.grid_shape)
        np.testing.assert_array_equal(piece.tissue, sample.grid.in_tissue)
        np.testing.assert_allclose(piece.maps.sum(axis=(1, 2)), 1, rtol=1e-5)
        assert np.all(piece.maps[:, ~piece.tissue] == 0)
        assert np.isnan(piece.scores[:, ~piece.tissue]).all()
        assert piece.tile_size == 256 and piece.grid_origin[0] % 256 == 0
        assert piece.arrays["map_contributions"].shape == (4, 4)
    assert result.classes == tiny_cohort.classes and result.model_kind == "grid-attention"
    assert np.isclose(result.probabilities.sum(), 1, atol=1e-5)
    assert result.timings["total"] > 0 and result.info["tiles"] == sum(s.n_tiles for s in samples)
    # saved and loaded back identically
    again = SlideResult.load(result.save(tmp_path / "result"))
    assert again.predicted == result.predicted
    for a, b in zip(again.pieces, result.pieces, strict=True):
        np.testing.assert_array_equal(a.maps, b.maps)
        np.testing.assert_array_equal(a.probabilities, b.probabilities)


def test_predict_equals_the_model_on_the_tiles_in_one_batch(tiny_cohort, tiny_grid_model):
    entry = tiny_cohort.split("test")[1]
    model, _ = load_model(tiny_grid_model)
    result = run_to_end(predict(model, entry.slide, device="cpu", chunk_tiles=5, amp=False))
    with open_slide(entry.slide) as slide:
        sample = slide_pieces(slide, 256)[0]
        level = result.pieces[0].level
        tiles = np.stack([slide.read_region(level, *map(int, b)) for b in sample.grid.boxes()])
    with torch.no_grad():
        out = model(torch.from_numpy(tiles), torch.from_numpy(sample.cells), sample.grid_shape)
    np.testing.assert_allclose(
        result.pieces[0].probabilities, torch.softmax(out.logits, 0).numpy(), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(result.pieces[0].maps, out.maps.numpy(), rtol=1e-4, atol=1e-6)


def test_a_slide_without_tissue_is_a_clear_error(tmp_path, tiny_grid_model):
    import tifffile

    path = tmp_path / "glass.tif"
    tifffile.imwrite(
        path,
        np.full((1024, 1024, 3), 245, np.uint8),
        tile=(256, 256),
        resolution=(20000, 20000),
        resolutionunit="CENTIMETER",
    )
    with pytest.raises(ValueError, match="no tissue"):
        run_to_end(predict(tiny_grid_model, path, device="cpu"))


def test_bf16_autocast_on_cpu_stays_close_to_float32(tiny_cohort, tiny_grid_model):
    entry = tiny_cohort.split("test")[2]
    exact = run_to_end(predict(tiny_grid_model, entry.slide, device="cpu", amp=False))
    mixed = run_to_end(predict(tiny_grid_model, entry.slide, device="cpu", amp=True))
    assert mixed.info["amp"] and not exact.info["amp"]
    for a, b in zip(mixed.pieces, exact.pieces, strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=0.05)
        np.testing.assert_allclose(a.maps, b.maps, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_autocast_channels_last_matches_cpu(tiny_cohort, tiny_grid_model):
    entry = tiny_cohort.split("test")[3]
    cpu = run_to_end(predict(tiny_grid_model, entry.slide, device="cpu", amp=False))
    gpu = run_to_end(predict(tiny_grid_model, entry.slide, device="cuda"))
    assert gpu.info["device"].startswith("cuda") and gpu.info["amp"]
    for a, b in zip(gpu.pieces, cpu.pieces, strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=0.05)


def test_tiles_events_follow_every_chunk_and_a_stop_ends_the_run_within_one(
    tiny_cohort, tiny_grid_model
):
    slide = tiny_cohort.split("test")[0].slide
    events = []
    result = run_to_end(predict(tiny_grid_model, slide, chunk_tiles=4), events.append)
    tiles = [e for e in events if e.stage == "tiles"]
    steps = np.diff([0] + [e.done for e in tiles])
    assert tiles[-1].done == tiles[-1].total == result.info["tiles"]
    assert steps.max() <= 4 and steps.min() >= 1 and len(tiles) > 2

    job = Job(predict(tiny_grid_model, slide, chunk_tiles=4))
    seen = []

    def stop_at_the_second_chunk(event) -> None:
        seen.append(event)
        if event.stage == "tiles" and event.done > 4:
            job.stop("cancelled")

    with pytest.raises(Stopped, match="cancelled"):
        job.run(stop_at_the_second_chunk)
    assert seen[-1].stage == "tiles" and not [e for e in seen if e.stage == "piece"][1:]


def test_an_option_the_kind_does_not_take_is_refused_before_any_work(tiny_cohort, tiny_grid_model):
    slide = tiny_cohort.split("test")[0].slide
    work = predict(tiny_grid_model, slide, sampler="random")
    with pytest.raises(ValueError, match=r"does not take the option\(s\) sampler"):
        next(work)
