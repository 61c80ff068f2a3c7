"""A sampled tile relabelled in the Review panel trains the dual model's glimpse network:
the Fine-tune panel, with tile labels from regions, runs the real CLI on the label store,
and the tile's new class reaches the training's tile labels (a tiny model, end to end)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from napari_slide_attention.jobs import run_to_end
from napari_slide_attention.models.checkpoint import read_checkpoint, save_checkpoint
from napari_slide_attention.models.dual_attention import DualAttention, DualAttentionConfig
from napari_slide_attention.train.cohort import make_synthetic_cohort, write_cohort
from tiny_models import TINY_HARD

PLUGIN = "napari-slide-attention"
CLASSES = ("normal", "low-grade", "high-grade", "carcinoma")

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """Four 1536 x 1024 slides per split (one per class), no lesion boxes known: the
    only region any tile can overlap is the one the test's annotator draws."""
    folder = tmp_path_factory.mktemp("regions-cohort")
    cohort = make_synthetic_cohort(
        folder,
        slides_per_class={"train": 1, "val": 1},
        size=(1536, 1024),
        seed=11,
        lesion_size=60,
        n_pieces=1,
    )
    entries = [replace(e, lesions=[]) for e in cohort.entries]
    return write_cohort(folder / "no-lesions.csv", replace(cohort, entries=entries))


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """An untrained tiny dual model whose N tiles cover every tissue cell of a slide
    (distance 0, one tile per attention cell), so training reads the relabelled tile."""
    config = DualAttentionConfig(
        classes=CLASSES,
        soft={"pool": 8},
        n_tiles=24,
        min_distance=0.0,
        tile_um=128.0,
        feature_px=32,
        feature_width=8,
        hard=dict(TINY_HARD),
    )
    model = DualAttention(config)
    path = tmp_path_factory.mktemp("base") / "best.safetensors"
    return save_checkpoint(path, config.kind, config.to_dict(), model.state_dict(), {})


def test_a_relabelled_sampled_tile_trains_the_glimpse_model(
    make_napari_viewer, qtbot, small_cohort, base_checkpoint, tmp_path
):
    from napari_slide_attention._napari.session import session_for
    from napari_slide_attention.inference import predict

    viewer = make_napari_viewer()
    session = session_for(viewer)
    store_path = tmp_path / "labels.sqlite"
    cohort = session.open_cohort(small_cohort, labels=store_path)
    index = next(i for i, e in enumerate(cohort.entries) if e.split == "train" and e.label == 0)
    slide = session.open_cohort_slide(index).path
    session.show_result(run_to_end(predict(base_checkpoint, slide, device="cpu")))

    # the annotator selects a sampled tile and calls it carcinoma (a missed lesion)
    _, review = viewer.window.add_plugin_dock_widget(PLUGIN, "Review")
    review.author.setText("dr-b")
    tiles = session.layer("sampled tiles")
    assert tiles is not None and len(tiles.data) > 0
    tiles.selected_data = {0}
    review.region_class.setCurrentText("carcinoma")
    review.tiles_button.click()
    (region,) = session.labels.regions(slide)
    assert (region.kind, region.label, region.author) == ("tile", "carcinoma", "dr-b")

    # fine-tune from the Fine-tune panel with tile labels from regions
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    assert panel.cohort.text() == str(small_cohort)
    assert panel.labels.text() == str(store_path)
    panel.base.addItem(str(base_checkpoint))
    panel.base.setCurrentText(str(base_checkpoint))
    panel.out.setText(str(tmp_path / "ft"))
    panel.epochs.setValue(1)
    panel.device.setCurrentText("cpu")
    panel.tile_labels.setCurrentIndex(panel.tile_labels.findData("regions"))
    assert "Review panel" in panel.tile_labels.toolTip()
    panel.start()
    events: list[dict] = []
    panel.worker.yielded.connect(events.append)
    qtbot.waitUntil(lambda: not panel.running, timeout=300_000)
    outcome = panel.outcome
    assert outcome is not None and outcome.status == "done", panel.error.toPlainText()

    launch = next(e for e in events if e["stage"] == "launch")["data"]["command"]
    assert launch[launch.index("--tile-labels") + 1] == "regions"
    assert launch[launch.index("--labels") + 1] == str(store_path)
    labels = next(e for e in events if e["stage"] == "labels")["data"]
    assert labels["regions"] == 1 and labels["slides_with_regions"] == 1
    prepared = [e["message"] for e in events if e["stage"] == "prepare"]
    assert any(slide.name in m and "1 region(s) (carcinoma)" in m for m in prepared)
    # the relabelled tile was a training tile of class carcinoma; no other region exists,
    # so every other training tile took the lowest-risk class
    row = json.loads((tmp_path / "ft" / "log.json").read_text())[0]
    counts = row["train_tile_labels"]
    assert counts["carcinoma"] >= 1 and counts["low-grade"] == counts["high-grade"] == 0
    assert counts["normal"] > counts["carcinoma"]
    config = read_checkpoint(outcome.best, tensors=False).config
    assert config["slide_call"] == "highest-risk"
    assert outcome.evaluation  # the before/after table on the validation split
