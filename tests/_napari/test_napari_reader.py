"""The napari reader contribution: which paths it takes, and the layers in a real viewer
(slides, and result folders with their slide and overlays)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from test_results_roundtrip import ROLES, make_result, overlays

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


# -- result folders -----------------------------------------------------------------------

RESULT_KINDS = ("grid-attention", "sliding-window", "dual-attention")


@pytest.fixture
def needle(tmp_path):
    from napari_slide_attention.slide.synthetic import write_synthetic_slide

    path = tmp_path / "slides" / "needle.tif"
    path.parent.mkdir()
    write_synthetic_slide(
        path, size=(2048, 1536), label="carcinoma", seed=3, n_pieces=1, lesion_size=30
    )
    return path


@pytest.fixture
def warnings_shown():
    """The messages of the napari warnings shown while the test runs."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    shown: list[str] = []

    def keep(notification):
        if notification.severity == NotificationSeverity.WARNING:
            shown.append(str(notification.message))

    notification_manager.notification_ready.connect(keep)
    yield shown
    notification_manager.notification_ready.disconnect(keep)


@pytest.mark.parametrize("kind", RESULT_KINDS)
def test_reader_takes_a_result_folder_with_its_slide_and_every_overlay(tmp_path, needle, kind):

    result = make_result(kind, needle)
    folder = result.save(tmp_path / "result")
    reader = get_reader(str(folder))
    assert reader is not None
    layers = reader(str(folder))
    (_, slide_kwargs, slide_kind), *overlay_tuples = layers
    assert slide_kind == "image" and slide_kwargs["multiscale"]
    assert slide_kwargs["metadata"]["path"] == str(needle)
    roles = [kwargs["metadata"]["result_role"] for _, kwargs, _ in overlay_tuples]
    assert roles == ROLES[kind]
    loaded = slide_kwargs["metadata"]["result"]
    assert loaded.model_kind == kind and loaded.predicted_class == "carcinoma"
    for _, kwargs, _ in overlay_tuples:
        assert kwargs["metadata"]["result"] is loaded
        assert kwargs["metadata"]["result_roles"] == ROLES[kind]
        assert kwargs["units"][-2:] == ("µm", "µm")


def test_reader_declines_folders_that_are_not_results(tmp_path, needle):

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    assert get_reader(str(plain)) is None
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "result.json").write_text('{"format": "somebody else"}')
    assert get_reader(str(foreign)) is None
    # several results at once: each would replace the slide on show
    a = make_result("grid-attention", needle).save(tmp_path / "a")
    b = make_result("grid-attention", needle).save(tmp_path / "b")
    assert get_reader([str(a), str(b)]) is None


def test_reader_reports_a_damaged_result_folder(tmp_path, needle):
    import shutil

    from napari_slide_attention.results import ResultError

    folder = make_result("grid-attention", needle).save(tmp_path / "result")
    shutil.rmtree(folder / "arrays.zarr")
    reader = get_reader(str(folder))
    assert reader is not None
    with pytest.raises(ResultError, match=r"arrays\.zarr"):
        reader(str(folder))


def test_reader_gives_the_overlays_alone_and_a_warning_when_the_slide_moved(
    tmp_path, needle, warnings_shown
):

    folder = make_result("dual-attention", needle, mpp=(0.25, 0.5)).save(tmp_path / "result")
    needle.rename(tmp_path / "moved.tif")
    layers = get_reader(str(folder))(str(folder))
    roles = [kwargs["metadata"].get("result_role") for _, kwargs, _ in layers]
    assert roles == ROLES["dual-attention"]  # no slide layer, every overlay
    # at the result's geometry: soft attention cells of 128 px at (0.5, 0.25) µm/px
    _, soft, _ = layers[0]
    assert soft["scale"] == pytest.approx((128 * 0.5, 128 * 0.25))
    [message] = warnings_shown
    assert "needle.tif was not found" in message and "Open result" in message


@pytest.mark.gui
@pytest.mark.parametrize("kind", RESULT_KINDS)
def test_viewer_opens_a_result_folder_and_the_session_adopts_it(
    make_napari_viewer, tmp_path, needle, kind
):
    from napari_slide_attention._napari.session import session_for
    from napari_slide_attention.results import SlideResult

    viewer = make_napari_viewer()
    session = session_for(viewer)
    other = tmp_path / "other.svs"
    write_svs(other, IMG, mpp=0.499)
    session.open_slide(other)  # its layers go when the result's slide comes
    shown = []
    session.result_shown.connect(shown.append)
    folder = make_result(kind, needle).save(tmp_path / "result")
    viewer.open(str(folder), plugin="napari-slide-attention")
    assert len(viewer.layers) == 1 + len(ROLES[kind])
    assert session.slide is not None and session.layer("slide") is viewer.layers[0]
    assert isinstance(session.result, SlideResult) and session.result.model_kind == kind
    assert shown == [session.result]  # once, when every overlay was in
    assert list(overlays(session)) == ROLES[kind]
    if kind == "grid-attention":  # the strongest map on show, as after a run
        assert viewer.dims.current_step[0] == 0
    # a run's result (here: the same again) replaces the dropped layers in place
    first = session.layer(ROLES[kind][0])
    session.show_result(make_result(kind, needle))
    assert session.layer(ROLES[kind][0]) is first and len(viewer.layers) == 1 + len(ROLES[kind])
    # the Model panel opened afterwards shows the call and offers to save it
    _, panel = viewer.window.add_plugin_dock_widget("napari-slide-attention", "Model")
    assert "carcinoma" in panel.call.text() and panel.save_button.isEnabled()


@pytest.mark.gui
def test_a_result_dropped_before_any_panel_is_adopted_when_one_opens(
    make_napari_viewer, tmp_path, needle
):
    from napari_slide_attention._napari.session import session_for

    viewer = make_napari_viewer()
    folder = make_result("grid-attention", needle).save(tmp_path / "result")
    viewer.open(str(folder), plugin="napari-slide-attention")
    _, panel = viewer.window.add_plugin_dock_widget("napari-slide-attention", "Model")
    session = session_for(viewer)
    assert session.slide is not None and session.result is not None
    assert session.layer("attention") is not None
    assert "carcinoma" in panel.call.text()


@pytest.mark.gui
def test_viewer_opens_the_overlays_of_a_result_whose_slide_moved(
    make_napari_viewer, tmp_path, needle, warnings_shown
):
    from napari_slide_attention._napari.session import session_for

    viewer = make_napari_viewer()
    session = session_for(viewer)
    other = tmp_path / "other.svs"
    write_svs(other, IMG, mpp=0.499)
    session.open_slide(other)
    folder = make_result("grid-attention", needle).save(tmp_path / "result")
    needle.rename(tmp_path / "moved.tif")
    viewer.open(str(folder), plugin="napari-slide-attention")  # no traceback
    assert [layer.name for layer in viewer.layers] == ["attention maps (carcinoma)"]
    assert session.slide is None  # the other slide was let go: the overlays are not its
    assert session.result is not None and session.layer("attention") is viewer.layers[0]
    assert session.scale == pytest.approx((0.5, 0.5))  # the result's geometry
    assert len(warnings_shown) == 1 and "was not found" in warnings_shown[0]
