"""Training the grid-attention model: files, schedule, resume, fine-tuning."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from napari_slide_attention.jobs import run_to_end
from napari_slide_attention.models.checkpoint import load_model, read_checkpoint
from napari_slide_attention.models.grid_attention import GridAttention
from napari_slide_attention.train.grid import GridTrainSettings, slide_loss, train_grid


def tiny_settings(**kw) -> GridTrainSettings:
    values = dict(
        epochs=2,
        tile_um=128.0,
        input_px=64,
        n_maps=4,
        chunk_tiles=32,
        normalise_tiles=16,
        augment=True,
    )
    values.update(kw)
    return GridTrainSettings.from_dict(values)


def test_paper_schedule():
    s = GridTrainSettings()
    assert s.learning_rate(0) == pytest.approx(1e-3)
    assert s.learning_rate(10) == pytest.approx(1e-3 * 0.95**10)
    assert s.learning_rate(50) == pytest.approx(1e-4)
    assert s.learning_rate(51) == pytest.approx(1e-4 * 0.95)
    assert s.learning_rate(149) == pytest.approx(1e-4 * 0.95**49)
    m = s.model  # the model's settings, nested: the config's defaults (the paper's)
    assert (s.epochs, s.samples_per_step, m["n_maps"], m["kernel"], m["dropout"]) == (
        200,
        2,
        64,
        3,
        0.5,
    )
    assert s.scale_range == (0.8, 1.2) and m["input_px"] == 224 and m["trainable_blocks"] == 1


def test_model_settings_nest_and_flat_ones_are_read_into_them():
    flat = GridTrainSettings.from_dict({"epochs": 3, "n_maps": 8, "hidden": (16,)})
    nested = GridTrainSettings.from_dict({"epochs": 3, "model": {"n_maps": 8, "hidden": [16]}})
    assert flat == nested and flat.model["n_maps"] == 8 and flat.model["tile_um"] == 246.0
    assert flat.model_config(("a", "b", "c")).hidden == (16,)
    assert GridTrainSettings.from_dict(flat.to_dict()) == flat  # the record round trip
    with pytest.raises(ValueError, match="unknown grid-attention model settings: maps"):
        GridTrainSettings(model={"maps": 8})
    with pytest.raises(ValueError, match="kernel a positive odd number"):  # the config's check
        GridTrainSettings.from_dict({"kernel": 4})
    with pytest.raises(ValueError, match="n_maps given twice"):
        GridTrainSettings.from_dict({"n_maps": 8, "model": {"n_maps": 4}})


def test_init_takes_the_model_settings_from_the_checkpoint(tiny_grid_model):
    from napari_slide_attention.models.checkpoint import read_checkpoint

    config = read_checkpoint(tiny_grid_model, tensors=False).config
    taken = GridTrainSettings.from_dict({"trainable_blocks": 2}).with_model(config)
    assert taken.model["n_maps"] == config["n_maps"] == 4
    assert taken.model["tile_um"] == config["tile_um"]
    assert taken.model["trainable_blocks"] == 2  # how much trains stays the fine-tune's
    with pytest.raises(ValueError, match=r"n_maps=16 \(the checkpoint's: 4\)"):
        GridTrainSettings.from_dict({"n_maps": 16}).with_model(config)


def test_a_run_writes_checkpoints_logs_and_state(tiny_cohort, tmp_path):
    events = []
    summary = run_to_end(train_grid(tiny_cohort, tmp_path / "run", tiny_settings()), events.append)
    run = tmp_path / "run"
    for name in (
        "settings.json",
        "log.csv",
        "log.json",
        "last.safetensors",
        "best.safetensors",
        "training-state.safetensors",
        "checkpoints/epoch-0001.safetensors",
        "checkpoints/epoch-0002.safetensors",
    ):
        assert (run / name).exists(), name
    assert summary.epochs_done == 2 and summary.best == run / "best.safetensors"
    log = json.loads((run / "log.json").read_text())
    assert [r["epoch"] for r in log] == [0, 1]
    assert {"train_loss", "lr", "val_mean_f1", "val_accuracy", "seconds"} <= set(log[0])
    header = (run / "log.csv").read_text().splitlines()[0].split(",")
    assert "val_mean_f1" in header and "val_metrics" not in header
    stages = [e.stage for e in events]
    assert stages.count("epoch") == 2 and "step" in stages and stages[0] == "prepare"
    # the checkpoint is self-describing: config with classes and normalisation
    ckpt = read_checkpoint(run / "last.safetensors")
    assert ckpt.kind == "grid-attention" and tuple(ckpt.config["classes"]) == tiny_cohort.classes
    assert ckpt.config["mean"] != [0.5, 0.5, 0.5] and ckpt.extra["epoch"] == 1
    model, _ = load_model(run / "last.safetensors")
    assert isinstance(model, GridAttention) and model.config.input_px == 64
    # only the head and the last block changed from the frozen trunk's calibration
    first = read_checkpoint(run / "checkpoints/epoch-0001.safetensors").tensors
    last = ckpt.tensors
    assert torch.equal(first["trunk.layer1.0.conv1.weight"], last["trunk.layer1.0.conv1.weight"])
    assert not torch.equal(
        first["trunk.layer4.0.conv1.weight"], last["trunk.layer4.0.conv1.weight"]
    )
    assert not torch.equal(first["attention.weight"], last["attention.weight"])


def test_slide_loss_is_the_mean_cross_entropy_of_the_true_class():
    rows = [
        {"label": 0, "probabilities": [0.5, 0.25, 0.25]},
        {"label": 2, "probabilities": [0.6, 0.4, 0.0]},  # certain and wrong: clipped
    ]
    expected = (-math.log(0.5) - math.log(1e-7)) / 2
    assert slide_loss(rows) == pytest.approx(expected)


@pytest.mark.parametrize("select", ["loss", "f1"])
def test_best_checkpoint_is_the_selected_epoch(tiny_cohort, tmp_path, select):
    run = tmp_path / "run"
    messages = []
    settings = tiny_settings(epochs=3, lr=3e-3, select=select)
    run_to_end(train_grid(tiny_cohort, run, settings), lambda e: messages.append(e.message))
    log = json.loads((run / "log.json").read_text())
    if select == "loss":
        chosen = min(range(len(log)), key=lambda e: log[e]["val_loss"])
        assert any("val loss" in m for m in messages)
    else:  # the first of the highest
        chosen = max(range(len(log)), key=lambda e: (log[e]["val_mean_f1"], -e))
    best = read_checkpoint(run / "best.safetensors")
    assert best.extra["epoch"] == chosen
    picked = read_checkpoint(run / f"checkpoints/epoch-{chosen + 1:04d}.safetensors")
    assert all(torch.equal(best.tensors[k], picked.tensors[k]) for k in best.tensors)
    assert all(r["val_loss"] >= 0 for r in log)


def test_unknown_selection_is_refused():
    with pytest.raises(ValueError, match="select"):
        GridTrainSettings(select="auroc")


def test_an_interrupted_run_resumes_where_it_stopped_and_ends_the_same(tiny_cohort, tmp_path):
    settings = tiny_settings(epochs=2, augment=True)
    run_to_end(train_grid(tiny_cohort, tmp_path / "whole", settings))
    work = train_grid(tiny_cohort, tmp_path / "cut", settings)
    for event in work:
        if event.stage == "epoch":
            work.close()  # killed after the first epoch's checkpoint
            break
    events = []
    run_to_end(train_grid(tiny_cohort, tmp_path / "cut", settings), events.append)
    assert any(e.stage == "resume" and e.done == 1 for e in events)
    assert sum(e.stage == "epoch" for e in events) == 1
    whole = read_checkpoint(tmp_path / "whole" / "last.safetensors").tensors
    cut = read_checkpoint(tmp_path / "cut" / "last.safetensors").tensors
    for name, tensor in whole.items():
        torch.testing.assert_close(cut[name], tensor, msg=name)
    log = json.loads((tmp_path / "cut" / "log.json").read_text())
    assert [r["epoch"] for r in log] == [0, 1]


def test_resuming_with_other_settings_is_refused(tiny_cohort, tmp_path):
    run_to_end(train_grid(tiny_cohort, tmp_path / "run", tiny_settings(epochs=1)))
    with pytest.raises(ValueError, match="other settings"):
        run_to_end(train_grid(tiny_cohort, tmp_path / "run", tiny_settings(epochs=1, lr=0.1)))
    # starting over is allowed
    run_to_end(
        train_grid(tiny_cohort, tmp_path / "run", tiny_settings(epochs=1, lr=0.1), resume=False)
    )


def test_a_run_folder_from_before_the_settings_nested_still_resumes(tiny_cohort, tmp_path):
    settings = tiny_settings(epochs=1)
    run_to_end(train_grid(tiny_cohort, tmp_path / "run", settings))
    record_file = tmp_path / "run" / "settings.json"
    record = json.loads(record_file.read_text())
    flat = {k: v for k, v in record["settings"].items() if k != "model"}
    record["settings"] = {**flat, **record["settings"]["model"]}  # the old, flat layout
    record_file.write_text(json.dumps(record))
    events = []
    run_to_end(train_grid(tiny_cohort, tmp_path / "run", settings), events.append)
    assert any(e.stage == "resume" and e.done == 1 for e in events)
    # a record this version cannot read says what to do
    record["settings"]["retired_option"] = 1
    record_file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"cannot read.*retired_option.*--no-resume"):
        run_to_end(train_grid(tiny_cohort, tmp_path / "run", settings))


def test_fine_tuning_starts_from_a_checkpoint(tiny_cohort, tmp_path):
    run_to_end(train_grid(tiny_cohort, tmp_path / "base", tiny_settings(epochs=1)))
    base = read_checkpoint(tmp_path / "base" / "last.safetensors")
    settings = tiny_settings(epochs=1, lr=1e-9, augment=False)
    run_to_end(
        train_grid(
            tiny_cohort, tmp_path / "tuned", settings, init=tmp_path / "base" / "last.safetensors"
        )
    )
    tuned = read_checkpoint(tmp_path / "tuned" / "last.safetensors")
    assert tuned.config["mean"] == base.config["mean"]
    torch.testing.assert_close(
        tuned.tensors["trunk.layer1.0.conv1.weight"], base.tensors["trunk.layer1.0.conv1.weight"]
    )
    # a tiny learning rate keeps the weights close to the base model's
    torch.testing.assert_close(
        tuned.tensors["attention.weight"], base.tensors["attention.weight"], atol=1e-5, rtol=0
    )


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        GridTrainSettings(epochs=0)
    with pytest.raises(ValueError, match="scale_range"):
        GridTrainSettings(scale_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="unknown"):
        GridTrainSettings.from_dict({"epochs": 1, "colour": "red"})


def test_validation_reuses_the_frozen_trunk_output_within_its_budget(
    tiny_cohort, tiny_grid_model, monkeypatch
):
    from napari_slide_attention.train.grid import FrozenCache, _prepare, evaluate_grid

    model, _ = load_model(tiny_grid_model)
    settings = tiny_settings()
    val = run_to_end(_prepare(tiny_cohort, "val", settings, model.config.risk, None))
    n_pieces = sum(len(item.pieces) for item in val)
    computed = []
    frozen_chunks = model.frozen_chunks
    monkeypatch.setattr(
        model, "frozen_chunks", lambda *a, **k: computed.append(1) or frozen_chunks(*a, **k)
    )

    def run(cache):
        _, rows = evaluate_grid(
            model,
            val,
            tiny_cohort.classes,
            device=torch.device("cpu"),
            amp=False,
            chunk_tiles=8,
            aggregation="highest-risk",
            frozen_cache=cache,
        )
        return np.array([row["probabilities"] for row in rows])

    plain = run(None)
    assert computed == []
    cache = FrozenCache(1 << 30)
    assert run(cache) == pytest.approx(plain, abs=1e-6)
    assert len(computed) == n_pieces and len(cache.pieces) == n_pieces
    assert run(cache) == pytest.approx(plain, abs=1e-6)
    assert len(computed) == n_pieces  # the second epoch computed nothing again
    smallest = min(sum(h.numel() * h.element_size() for h in p) for p in cache.pieces.values())
    small = FrozenCache(smallest - 1)  # not even one piece fits
    assert run(small) == pytest.approx(plain, abs=1e-6)
    assert small.pieces == {} and small.used == 0
