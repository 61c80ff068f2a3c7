"""Option values no work could use are refused before any work: one line naming the
option (or the file) and the problem, exit status 2, no traceback, no hang."""

from __future__ import annotations

import pytest

from napari_slide_attention.cli import main


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from napari_slide_attention.slide.synthetic import write_synthetic_slide

    path = tmp_path_factory.mktemp("bad-options") / "s.tif"
    write_synthetic_slide(path, size=(1024, 768), label="normal", seed=1)
    return path


@pytest.fixture(scope="module")
def grid_model(tmp_path_factory):
    """An untrained grid-attention checkpoint: these tests never get as far as running it."""
    from napari_slide_attention.models.checkpoint import save_checkpoint
    from napari_slide_attention.models.grid_attention import GridAttention, GridAttentionConfig

    config = GridAttentionConfig(
        classes=("normal", "low-grade", "high-grade", "carcinoma"),
        n_maps=2,
        tile_um=128.0,
        input_px=32,
    )
    path = tmp_path_factory.mktemp("bad-options-model") / "grid"
    return save_checkpoint(path, config.kind, config.to_dict(), GridAttention(config).state_dict())


@pytest.fixture
def no_inference(monkeypatch):
    """Fails the test if inference starts: every check must come before it."""
    import napari_slide_attention.inference as inference

    def refuse(*args, **kwargs):
        raise AssertionError("inference started before the options were checked")

    monkeypatch.setattr(inference, "predict", refuse)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("slide-attention: error: ")
    return err


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--mpp", "1e9"], "--mpp 1e+09"),
        (["--mpp", "0"], "--mpp 0"),
        (["--mpp", "nan"], "--mpp nan"),
        (["--mask-mpp", "1e-6"], "mask_mpp must be at least 1"),
        (["--closing-radius-um", "1e9"], "closing_radius_um must be at most"),
        (["--tissue", "smooth_sigma_um=1e7"], "smooth_sigma_um"),
        (["--device", "bogus"], "--device bogus"),
        (["--device", "mps"], "--device mps"),
    ],
)
def test_predict_refuses_unusable_options_before_any_work(
    slide, grid_model, tmp_path, capsys, no_inference, options, says
):
    argv = ["predict", "--model", str(grid_model), "--slide", str(slide)]
    assert main([*argv, "--out", str(tmp_path / "r"), "--quiet", *options]) == 2
    assert says in _one_line(capsys)
    assert not (tmp_path / "r").exists()


def test_predict_refuses_an_output_it_could_not_write_before_running(
    slide, grid_model, tmp_path, capsys, no_inference
):
    taken = tmp_path / "notes.txt"
    taken.write_text("a pathologist's notes")
    argv = ["predict", "--model", str(grid_model), "--slide", str(slide), "--quiet"]
    assert main([*argv, "--out", str(taken)]) == 2
    assert str(taken) in _one_line(capsys)
    assert taken.read_text() == "a pathologist's notes"

    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "data.csv").write_text("x")
    assert main([*argv, "--out", str(folder)]) == 2
    assert "not a result directory" in _one_line(capsys)
    assert (folder / "data.csv").read_text() == "x"


def test_a_pixel_size_that_makes_tiles_of_a_few_pixels_is_refused(
    slide, grid_model, tmp_path, capsys
):
    # 50 µm/px is a plausible pixel size for some image, but it cuts 128 µm tiles of
    # 2.6 px: the model would see nothing it was trained on, in ~10^5 tiles.
    argv = ["predict", "--model", str(grid_model), "--slide", str(slide), "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "r"), "--mpp", "50"]) == 2
    err = _one_line(capsys)
    assert str(slide) in err and "2.56 px" in err and "--mpp" in err


def test_info_refuses_an_absurd_pixel_size(slide, capsys):
    assert main(["info", str(slide), "--mpp", "1e9", "--no-tissue"]) == 2
    assert "--mpp" in _one_line(capsys)


def test_synth_takes_a_label_index_as_its_help_says(tmp_path, capsys):
    from napari_slide_attention.slide.synthetic import read_sidecar

    out = tmp_path / "n.tif"
    assert main(["synth", str(out), "--size", "1024", "768", "--label", "0"]) == 0
    assert read_sidecar(out.with_name("n.tif.json"))["label"] == "normal"
    assert main(["synth", str(tmp_path / "x.tif"), "--size", "1024", "768", "--label", "9"]) == 2
    assert "out of range" in _one_line(capsys)


def test_an_unforeseen_failure_is_one_line_and_exit_1(monkeypatch, slide, capsys):
    import napari_slide_attention.cli.slides as slides

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(slides, "cmd_info", broken)
    from napari_slide_attention.cli.parser import build_parser

    # the parser names the command function when it is built: rebuild it with the bug
    assert build_parser().parse_args(["info", str(slide)]).func is broken
    assert main(["info", str(slide)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("slide-attention: internal error: KeyError") and "--debug" in err
    with pytest.raises(KeyError):
        main(["--debug", "info", str(slide)])


def test_predict_names_a_slide_the_models_cannot_read(grid_model, tmp_path, capsys):
    import numpy as np
    import tifffile

    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, np.full((512, 512), 200, np.uint8), tile=(256, 256))
    argv = ["predict", "--model", str(grid_model), "--slide", str(grey), "--mpp", "0.5"]
    assert main([*argv, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = _one_line(capsys)
    assert str(grey) in err and "grey" in err and "8-bit RGB" in err
