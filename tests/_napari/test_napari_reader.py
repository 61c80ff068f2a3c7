"""The napari reader contribution: which paths it takes, and the layer in a real viewer."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_slide_attention._napari.layers import slide_layer_data
from napari_slide_attention._napari.reader import get_reader
from napari_slide_attention.slide.reader import SlideError, open_slide
from slide_files import rgb_image, write_fluorescence, write_generic, write_ome_zarr, write_svs

IMG = rgb_image(1000, 1300, seed=2)


def test_reader_declines_files_it_does_not_take(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert get_reader(str(text)) is None
    small = tmp_path / "small.tif"  # a plain, untiled, single-page TIFF: not a slide
    tifffile.imwrite(small, np.zeros((64, 64), np.uint8))
    assert get_reader(str(small)) is None
    fake = tmp_path / "fake.tif"
    fake.write_bytes(b"not a tiff at all")
    assert get_reader(str(fake)) is None
    assert get_reader([]) is None


def test_reader_reports_a_broken_slide_instead_of_passing(tmp_path):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"II*\x00" + bytes(10))
    reader = get_reader(str(broken))
    assert reader is not None
    with pytest.raises(SlideError, match=r"broken\.svs"):
        reader(str(broken))


def test_layer_data_rgb_in_micrometres(tmp_path):
    path = tmp_path / "slide.svs"
    write_svs(path, IMG, mpp=0.499)
    [(data, kwargs, kind)] = get_reader(str(path))(str(path))
    assert kind == "image"
    assert kwargs["multiscale"] and kwargs["rgb"]
    assert kwargs["scale"] == pytest.approx((0.499, 0.499))
    assert kwargs["units"] == ("µm", "µm")
    assert kwargs["name"] == "slide.svs"
    assert [d.shape[:2] for d in data] == [(1000, 1300), (250, 325), (62, 81)]
    metadata = kwargs["metadata"]
    assert metadata["vendor"] == "aperio" and metadata["magnification"] == 20
    assert set(metadata["associated"]) == {"thumbnail", "label", "macro"}
    assert metadata["slide"].associated["label"].shape == (120, 300, 3)


def test_layer_data_multichannel_splits_channels(tmp_path):
    path = tmp_path / "fluo.ome.tif"
    write_fluorescence(path, channels=3)
    [(_levels, kwargs, _)] = slide_layer_data(open_slide(path))
    assert kwargs["channel_axis"] == 2 and not kwargs["rgb"]
    assert kwargs["name"] == ["fluo.ome.tif [0]", "fluo.ome.tif [1]", "fluo.ome.tif [2]"]
    low, high = kwargs["contrast_limits"][0]
    assert 0 <= low < high <= 4000


@pytest.mark.gui
def test_viewer_opens_a_slide_as_one_multiscale_layer(make_napari_viewer, tmp_path):
    path = tmp_path / "slide.svs"
    write_svs(path, IMG, mpp=0.499)
    # Shown (on Xvfb): a hidden vispy canvas renders nothing into screenshots.
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(str(path), plugin="napari-slide-attention")
    assert len(layers) == 1 and len(viewer.layers) == 1
    layer = viewer.layers[0]
    assert layer.name == "slide.svs"
    assert layer.multiscale and layer.rgb
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert len(layer.data) == 3
    # World extent = slide size in µm: overlays in µm line up with it.
    extent = viewer.layers.extent.world
    assert extent[1][0] - extent[0][0] == pytest.approx(1000 * 0.499, rel=0.01)
    assert extent[1][1] - extent[0][1] == pytest.approx(1300 * 0.499, rel=0.01)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    # The pink tissue is on screen: the canvas really drew the slide.
    pink = (shot[..., 0] > 180) & (shot[..., 1] < 170) & (shot[..., 2] > 140)
    assert pink.mean() > 0.02


@pytest.mark.gui
def test_viewer_opens_ome_zarr_directory(make_napari_viewer, tmp_path):
    path = tmp_path / "slide.ome.zarr"
    write_ome_zarr(path, IMG, mpp=0.5)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-slide-attention")
    layer = viewer.layers[0]
    assert layer.multiscale and layer.rgb
    assert tuple(layer.scale) == pytest.approx((0.5, 0.5))
    np.testing.assert_array_equal(np.asarray(layer.data[2]), open_slide(path).levels[2].compute())


@pytest.mark.gui
def test_viewer_shows_an_error_for_a_corrupt_slide_without_crashing(make_napari_viewer, tmp_path):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"II*\x00" + bytes(10))
    viewer = make_napari_viewer()
    with pytest.raises(Exception, match=r"broken\.svs"):
        viewer.open(str(broken), plugin="napari-slide-attention")
    assert len(viewer.layers) == 0
    path = tmp_path / "ok.tif"
    write_generic(path, IMG, mpp=0.5)
    viewer.open(str(path), plugin="napari-slide-attention")
    assert len(viewer.layers) == 1


@pytest.mark.gui
def test_sample_data_opens_the_synthetic_slide(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    viewer = make_napari_viewer()
    viewer.open_sample("napari-slide-attention", "needle_slide")
    [layer] = viewer.layers
    assert layer.multiscale and layer.rgb
    assert tuple(layer.scale) == pytest.approx((0.5, 0.5))
    assert (tmp_path / "napari-slide-attention").is_dir()
    assert layer.metadata["vendor"] == "generic-tiff"
