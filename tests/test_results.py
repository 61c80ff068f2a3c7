"""Tests of SlideResult / PieceResult: validation, geometry, and the directory format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from napari_slide_attention import results
from napari_slide_attention.results import (
    RESULT_FORMAT_VERSION,
    PieceResult,
    ResultError,
    SlideResult,
)

CLASSES = ("normal", "low-grade", "high-grade")
# float32 values with no short decimal form: a JSON round trip through float64 text that is
# not exact would change them.
P_SLIDE = np.array([0.1, 1 / 3, 0.5666667], dtype=np.float32)


def softmax_maps(rng, tissue, m):
    """(m, H', W') float32 softmax over the tissue positions of random scores, 0 off tissue."""
    scores = rng.normal(size=(m, *tissue.shape)).astype(np.float32)
    scores[:, ~tissue] = np.nan
    e = np.exp(np.where(tissue, scores, -np.inf))
    maps = (e / e.sum(axis=(1, 2), keepdims=True)).astype(np.float32)
    return maps, scores


def make_piece(rng, index, grid_shape, origin, m=4, **kw):
    tissue = rng.random(grid_shape) > 0.3
    tissue[0, 0] = True
    maps, scores = softmax_maps(rng, tissue, m)
    p = rng.random(len(CLASSES)).astype(np.float32)
    return PieceResult(
        index=index,
        box=(origin[0] + 10, origin[1] + 20, grid_shape[1] * 256 - 30, grid_shape[0] * 256 - 40),
        probabilities=p / p.sum(),
        grid_origin=origin,
        tile_size=256,
        level=1,
        maps=maps,
        scores=scores,
        tissue=tissue,
        **kw,
    )


def make_result(seed=0, **kw):
    rng = np.random.default_rng(seed)
    pieces = [
        make_piece(
            rng,
            0,
            (5, 7),
            (512, 1024),
            arrays={"tile_probabilities": rng.random((5, 7, 3)).astype(np.float32)},
            info={"area_mm2": 12.5, "holes": [1, 2]},
        ),
        make_piece(rng, 3, (9, 2), (4096, 0), arrays={"rank": np.arange(18, dtype=np.int16)}),
    ]
    args = dict(
        slide="/data/slides/case 7.svs",
        model_kind="grid-attention",
        classes=CLASSES,
        probabilities=P_SLIDE,
        predicted=2,
        aggregation="highest-risk",
        pieces=pieces,
        timings={"read": 1.25, "model": 0.5, "total": 1.875},
        model={"checkpoint": "/models/tomita.safetensors", "m": 4, "config": {"dims": [64, 32]}},
        slide_info={"mpp": [0.25, 0.25], "shape": [40000, 60000], "vendor": "aperio"},
        arrays={"overview": rng.random((3, 4)), "flags": np.array([True, False])},
        info={"note": "unit test", "nested": {"ok": True, "none": None}},
    )
    args.update(kw)
    return SlideResult(**args)


def assert_same_piece(a: PieceResult, b: PieceResult):
    assert (a.index, a.box, a.grid_origin, a.tile_size, a.level) == (
        b.index,
        b.box,
        b.grid_origin,
        b.tile_size,
        b.level,
    )
    assert a.info == b.info
    for name in ("probabilities", "maps", "scores", "tissue"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None, name
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, name
        # assert_array_equal treats NaN as equal to NaN only at the same positions.
        assert_array_equal(x, y, err_msg=name, strict=True)
    assert a.arrays.keys() == b.arrays.keys()
    for name in a.arrays:
        assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name, strict=True)


def assert_same_result(a: SlideResult, b: SlideResult):
    for name in (
        "slide",
        "model_kind",
        "classes",
        "predicted",
        "aggregation",
        "timings",
        "model",
        "slide_info",
        "info",
        "created",
        "version",
    ):
        assert getattr(a, name) == getattr(b, name), name
    assert_array_equal(a.probabilities, b.probabilities, strict=True)
    assert a.arrays.keys() == b.arrays.keys()
    for name in a.arrays:
        assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name, strict=True)
    assert len(a.pieces) == len(b.pieces)
    for pa, pb in zip(a.pieces, b.pieces, strict=True):
        assert_same_piece(pa, pb)


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary or backup siblings of result directory `name` that save() left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ----------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_is_exact(tmp_path):
    result = make_result()
    out = result.save(tmp_path / "res")
    assert out == tmp_path / "res"
    assert (out / "result.json").is_file() and (out / "arrays.zarr").is_dir()
    loaded = SlideResult.load(out)
    assert_same_result(result, loaded)
    # The grids differ between pieces and the NaNs sit off tissue, where they were put.
    assert loaded.pieces[0].grid_shape == (5, 7) and loaded.pieces[1].grid_shape == (9, 2)
    for piece in loaded.pieces:
        assert piece.tissue.dtype == np.bool_
        assert_array_equal(
            np.isnan(piece.scores), np.broadcast_to(~piece.tissue, piece.scores.shape)
        )
    assert loaded.pieces[1].arrays["rank"].dtype == np.int16
    assert leftovers(tmp_path, "res") == []


def test_json_is_readable_and_indexes_arrays(tmp_path):
    result = make_result()
    meta = json.loads((result.save(tmp_path / "res") / "result.json").read_text())
    assert meta["version"] == RESULT_FORMAT_VERSION
    assert meta["classes"] == list(CLASSES)
    assert meta["predicted_class"] == "high-grade"
    # Shortest float32 repr, not the float64 expansion of the float32 value.
    assert meta["probabilities"][0] == 0.1
    assert meta["array_index"]["pieces/0/maps"] == {"shape": [4, 5, 7], "dtype": "float32"}
    assert meta["array_index"]["pieces/1/tissue"] == {"shape": [9, 2], "dtype": "bool"}
    assert meta["array_index"]["pieces/1/arrays/rank"] == {"shape": [18], "dtype": "int16"}
    assert meta["array_index"]["arrays/flags"] == {"shape": [2], "dtype": "bool"}
    assert meta["pieces"][1]["index"] == 3
    assert result.to_json_dict() == meta


def test_maps_are_chunked_one_per_map(tmp_path):
    import zarr

    out = make_result().save(tmp_path / "res")
    group = zarr.open_group(out / "arrays.zarr", mode="r")
    assert group["pieces/0/maps"].chunks == (1, 5, 7)
    assert group["pieces/1/scores"].chunks == (1, 9, 2)


def test_minimal_result_round_trips(tmp_path):
    # A sliding-window style result: no maps, no pieces' grids, no arrays at all.
    piece = PieceResult(0, (0, 0, 10, 10), [0.25, 0.75], grid_origin=(0, 0), tile_size=5)
    result = SlideResult(
        slide="s.tif",
        model_kind="sliding-window",
        classes=("a", "b"),
        probabilities=[0.25, 0.75],
        predicted=1,
        aggregation="mean",
        pieces=[piece],
        timings={},
        model={},
        slide_info={},
    )
    loaded = SlideResult.load(result.save(tmp_path / "res"))
    assert_same_result(result, loaded)
    assert loaded.pieces[0].grid_shape is None


def test_save_replaces_existing_result(tmp_path):
    target = tmp_path / "res"
    make_result(seed=1).save(target)
    (target / "arrays.zarr" / "stale-file").write_text("from the old result")
    newer = make_result(seed=2, predicted=0, aggregation="mean")
    newer.save(target)
    loaded = SlideResult.load(target)
    assert_same_result(newer, loaded)
    assert not (target / "arrays.zarr" / "stale-file").exists()
    assert leftovers(tmp_path, "res") == []


def test_save_into_empty_existing_directory_and_new_parents(tmp_path):
    (tmp_path / "empty").mkdir()
    make_result().save(tmp_path / "empty")
    SlideResult.load(tmp_path / "empty")
    make_result().save(tmp_path / "a" / "b" / "res")
    SlideResult.load(tmp_path / "a" / "b" / "res")


def test_save_refuses_to_replace_other_things(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(ResultError, match="not a result directory") as err:
        make_result().save(other)
    assert err.value.path == str(other)
    assert (other / "precious.txt").read_text() == "keep"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ResultError, match="not a directory"):
        make_result().save(tmp_path / "file")
    assert leftovers(tmp_path, "mine") == [] and leftovers(tmp_path, "file") == []


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_crash_mid_save_keeps_previous_result(tmp_path, monkeypatch, exc):
    target = tmp_path / "res"
    previous = make_result(seed=1)
    previous.save(target)
    real_write = results._write_array
    calls = []

    def failing_write(group, key, arr):
        calls.append(key)
        if len(calls) == 3:  # after some arrays are on disk, like a real crash
            raise exc
        real_write(group, key, arr)

    monkeypatch.setattr(results, "_write_array", failing_write)
    with pytest.raises(type(exc)):
        make_result(seed=2).save(target)
    assert len(calls) == 3
    assert leftovers(tmp_path, "res") == []
    assert_same_result(previous, SlideResult.load(target))


def test_crash_in_rename_restores_previous_result(tmp_path, monkeypatch):
    target = tmp_path / "res"
    previous = make_result(seed=1)
    previous.save(target)
    real_replace = results.os.replace

    def failing_replace(src, dst):
        # Moving the old result aside works; moving the new one into place fails.
        if Path(src).name.startswith(".res.tmp-"):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(results.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        make_result(seed=2).save(target)
    monkeypatch.undo()
    assert leftovers(tmp_path, "res") == []
    assert_same_result(previous, SlideResult.load(target))


# ----------------------------------------------------------------------------------------------
# Loading damaged results


def saved(tmp_path) -> Path:
    return make_result().save(tmp_path / "res")


def rewrite_json(directory: Path, change) -> None:
    path = directory / "result.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def test_load_missing_directory(tmp_path):
    with pytest.raises(ResultError, match="does not exist") as err:
        SlideResult.load(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)


def test_load_corrupted_json(tmp_path):
    out = saved(tmp_path)
    text = (out / "result.json").read_text()
    (out / "result.json").write_text(text[: len(text) // 2])
    with pytest.raises(ResultError, match="cannot be read as JSON") as err:
        SlideResult.load(out)
    assert err.value.path == str(out / "result.json")


def test_load_missing_json(tmp_path):
    out = saved(tmp_path)
    (out / "result.json").unlink()
    with pytest.raises(ResultError, match=r"no result\.json") as err:
        SlideResult.load(out)
    assert str(out) in str(err.value)


def test_load_missing_arrays(tmp_path):
    import shutil

    out = saved(tmp_path)
    shutil.rmtree(out / "arrays.zarr")
    with pytest.raises(ResultError, match=r"arrays\.zarr") as err:
        SlideResult.load(out)
    assert err.value.path == str(out / "arrays.zarr")


def test_load_missing_one_array(tmp_path):
    import shutil

    out = saved(tmp_path)
    shutil.rmtree(out / "arrays.zarr" / "pieces" / "1" / "scores")
    with pytest.raises(ResultError, match="pieces/1/scores"):
        SlideResult.load(out)


def test_load_future_version(tmp_path):
    out = saved(tmp_path)
    rewrite_json(out, lambda m: m.update(version=RESULT_FORMAT_VERSION + 1))
    with pytest.raises(ResultError, match=f"version {RESULT_FORMAT_VERSION + 1}.*update") as err:
        SlideResult.load(out)
    assert str(out / "result.json") in str(err.value)


def test_load_foreign_json(tmp_path):
    out = saved(tmp_path)
    (out / "result.json").write_text('{"hello": "world"}')
    with pytest.raises(ResultError, match="not a slide result"):
        SlideResult.load(out)


def test_load_missing_field(tmp_path):
    out = saved(tmp_path)
    rewrite_json(out, lambda m: m.pop("aggregation"))
    with pytest.raises(ResultError, match="missing field 'aggregation'"):
        SlideResult.load(out)


def test_is_result_directory_takes_saved_results_only(tmp_path):
    out = saved(tmp_path)
    assert results.is_result_directory(out) and results.is_result_directory(str(out))
    assert not results.is_result_directory(tmp_path / "nope")
    assert not results.is_result_directory(out / "result.json")  # a file, not a folder
    assert not results.is_result_directory(out / "arrays.zarr")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "result.json").write_text('{"hello": "world"}')
    assert not results.is_result_directory(foreign)
    (foreign / "result.json").write_bytes(b"\xff\xfe not json")
    assert not results.is_result_directory(foreign)
    (foreign / "result.json").write_text("[1, 2]")
    assert not results.is_result_directory(foreign)


def test_load_inconsistent_shapes(tmp_path):
    out = saved(tmp_path)

    def tissue_of_piece_0_from_piece_1(meta):
        # The index agrees with the swapped-in array, so only the grid check can catch it.
        meta["array_index"]["pieces/0/tissue"] = meta["array_index"]["pieces/1/tissue"]

    import shutil

    shutil.rmtree(out / "arrays.zarr" / "pieces" / "0" / "tissue")
    shutil.copytree(
        out / "arrays.zarr" / "pieces" / "1" / "tissue",
        out / "arrays.zarr" / "pieces" / "0" / "tissue",
    )
    rewrite_json(out, tissue_of_piece_0_from_piece_1)
    with pytest.raises(ResultError, match="disagree on the grid"):
        SlideResult.load(out)


def test_load_probabilities_not_matching_classes(tmp_path):
    out = saved(tmp_path)
    rewrite_json(out, lambda m: m.update(classes=["a", "b"]))
    with pytest.raises(ResultError, match="3 values for 2 classes"):
        SlideResult.load(out)


def test_load_array_disagreeing_with_index(tmp_path):
    out = saved(tmp_path)
    rewrite_json(out, lambda m: m["array_index"]["arrays/flags"].update(shape=[3]))
    with pytest.raises(ResultError, match=r"result\.json says"):
        SlideResult.load(out)


# ----------------------------------------------------------------------------------------------
# Validation on construction


def piece_args(**kw):
    tissue = np.ones((2, 3), bool)
    args = dict(
        index=0,
        box=(0, 0, 100, 100),
        probabilities=np.array([0.5, 0.5], np.float32),
        grid_origin=(0, 0),
        tile_size=50,
        maps=np.full((2, 2, 3), 1 / 6, np.float32),
        scores=np.zeros((2, 2, 3), np.float32),
        tissue=tissue,
    )
    args.update(kw)
    return args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(index=-1), "piece index must be >= 0"),
        (dict(index=1.0), "piece index must be an integer"),
        (dict(box=(0, 0, 10)), r"box \(x, y, w, h\) must be 4 integers"),
        (dict(box=(0, 0, 0, 10)), "must have w, h > 0"),
        (dict(probabilities=[0.5, 1.5]), r"probabilities must lie in \[0, 1\]"),
        (dict(probabilities=[[0.5, 0.5]]), "probabilities must be 1-D"),
        (dict(probabilities=[np.nan, 0.5]), "probabilities must be finite"),
        (dict(tile_size=0), "tile_size must be >= 1"),
        (dict(tile_size=True), "tile_size must be an integer"),
        (dict(maps=np.ones((2, 3), np.float32)), r"maps \(m, H', W'\) must be 3-D"),
        (dict(maps=np.full((2, 2, 3), np.nan, np.float32)), "maps.*must be finite"),
        (
            dict(tissue=np.ones((2, 4), bool)),
            r"disagree on the grid.*maps \(2, 3\).*tissue \(2, 4\)",
        ),
        (dict(scores=np.zeros((3, 2, 3), np.float32)), "must have the same shape"),
        (dict(tissue=np.full((2, 3), 0.5)), "tissue.*must be bool"),
        (dict(arrays={"a/b": np.zeros(2)}), "array name 'a/b'"),
        (dict(arrays={"zarr.json": np.zeros(2)}), "array name 'zarr.json'"),
        (dict(arrays={"s": np.array(["x"])}), "must be a bool or numeric array"),
        (dict(info={"x": np.zeros(3)}), "not JSON"),
        (dict(info={1: "a"}), "non-string key 1"),
        (dict(info={"x": float("nan")}), "JSON cannot hold"),
    ],
)
def test_piece_validation(change, message):
    with pytest.raises(ValueError, match=message):
        PieceResult(**piece_args(**change))


def test_piece_normalisation():
    piece = PieceResult(
        **piece_args(
            index=np.int64(2),
            probabilities=[0.25, 0.75],
            maps=np.ones((1, 2, 3)),
            scores=None,
            tissue=np.array([[1, 0, 1], [0, 1, 1]]),
            arrays={"be": np.arange(3, dtype=">i4")},
            info={"t": (1, np.float32(0.5)), "p": Path("x")},
        )
    )
    assert piece.index == 2 and type(piece.index) is int
    assert piece.probabilities.dtype == np.float32 and piece.maps.dtype == np.float32
    assert piece.tissue.dtype == np.bool_ and piece.tissue.sum() == 4
    assert piece.arrays["be"].dtype == np.dtype("int32") and piece.arrays["be"].dtype.isnative
    assert piece.info == {"t": [1, 0.5], "p": "x"}
    assert piece.predicted == 1


def slide_args(**kw):
    args = dict(
        slide="s.svs",
        model_kind="grid-attention",
        classes=("a", "b"),
        probabilities=[0.5, 0.5],
        predicted=0,
        aggregation="highest-risk",
        pieces=[PieceResult(**piece_args())],
        timings={"total": 1.0},
        model={},
        slide_info={},
    )
    args.update(kw)
    return args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(probabilities=[0.2, 0.3, 0.5]), "3 values for 2 classes"),
        (dict(predicted=2), "predicted class 2 is out of range for 2 classes"),
        (dict(predicted=-1), "predicted must be >= 0"),
        (dict(classes="ab"), "classes must be a sequence"),
        (dict(classes=("a", "a")), "class names must be unique"),
        (dict(classes=(), probabilities=[]), "at least one class"),
        (dict(model_kind=""), "model_kind must not be empty"),
        (dict(pieces=[object()]), r"pieces\[0\] must be a PieceResult"),
        (
            dict(pieces=[PieceResult(**piece_args(probabilities=[0.2, 0.3, 0.5]))]),
            "piece 0 has 3 probabilities for 2 classes",
        ),
        (dict(pieces=[PieceResult(**piece_args())] * 2), "piece index 0 occurs more than once"),
        (dict(timings={"total": -1.0}), "timing 'total' must be finite and >= 0"),
        (dict(timings={"total": "1s"}), "timing 'total' must be a number"),
        (dict(model={"w": np.zeros(2)}), r"model\['w'\].*not JSON"),
        (dict(created="yesterday"), "created must be an ISO-8601 time"),
        (dict(version=RESULT_FORMAT_VERSION + 1), "newer than this package reads"),
    ],
)
def test_slide_validation(change, message):
    with pytest.raises(ValueError, match=message):
        SlideResult(**slide_args(**change))


def test_created_defaults_to_utc_now():
    from datetime import datetime, timedelta, timezone

    created = datetime.fromisoformat(SlideResult(**slide_args()).created)
    assert created.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - created) < timedelta(minutes=1)


# ----------------------------------------------------------------------------------------------
# Geometry and text


def test_tile_box_geometry():
    piece = PieceResult(**piece_args(grid_origin=(1000, 2000), tile_size=256))
    assert piece.grid_shape == (2, 3)
    assert piece.tile_box(0, 0) == (1000, 2000, 256, 256)
    # row is y, col is x
    assert piece.tile_box(1, 2) == (1000 + 2 * 256, 2000 + 256, 256, 256)
    for cell in [(2, 0), (0, 3), (-1, 0)]:
        with pytest.raises(IndexError, match="outside the grid"):
            piece.tile_box(*cell)


def test_summary_names_class_and_confidence():
    result = make_result()
    text = result.summary()
    assert result.predicted_class == "high-grade"
    assert result.confidence == pytest.approx(0.5666667)
    first = text.splitlines()[0]
    assert "high-grade" in first and "56.7%" in first
    assert "case 7.svs" in first and "grid-attention" in first and "2 tissue pieces" in first
    assert "piece 3:" in text and "9x2 tiles" in text
    assert "total 1.88 s" in text
    assert 3 <= len(text.splitlines()) <= 12


def test_summary_lists_few_pieces():
    rng = np.random.default_rng(0)
    pieces = [make_piece(rng, i, (2, 2), (0, 0), m=1) for i in range(20)]
    text = make_result(pieces=pieces).summary()
    assert "and 12 more pieces" in text
    assert len(text.splitlines()) <= 14


def test_repr_is_short():
    assert len(repr(make_result())) < 300
    assert "maps=(4, 5, 7)" in repr(make_result().pieces[0])
