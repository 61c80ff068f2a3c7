"""open_slide on every format, region reads against the stored pixels, and every bad file."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile

from napari_slide_attention.slide.reader import MissingMppWarning, SlideError, open_slide
from slide_files import (
    deadline,
    rgb_image,
    write_fluorescence,
    write_generic,
    write_ndpi,
    write_ndpi_restart_tiles,
    write_ome_tiff,
    write_ome_zarr,
    write_svs,
)

IMG = rgb_image(1000, 1300, seed=1)


def _write(kind: str, tmp_path):
    """Write one slide of a kind; return (path, references, expected facts)."""
    if kind == "svs-jpeg":
        path = tmp_path / "slide.svs"
        ref = write_svs(path, IMG, mpp=0.499, magnification=20)
        return path, ref, dict(vendor="aperio", mpp=0.499, mag=20.0, levels=3, tile=(256, 256))
    if kind == "svs-jpeg2000":
        path = tmp_path / "slide.svs"
        ref = write_svs(path, IMG, compression=33005, mpp=0.2527, magnification=40)
        return path, ref, dict(vendor="aperio", mpp=0.2527, mag=40.0, levels=3, tile=(256, 256))
    if kind == "ndpi":
        path = tmp_path / "slide.ndpi"
        ref = write_ndpi(path, IMG, mpp=0.4416, magnification=20.0)
        return path, ref, dict(vendor="hamamatsu", mpp=0.4416, mag=20.0, levels=3, tile=(64, 1300))
    if kind == "ome-tiff":
        path = tmp_path / "slide.ome.tif"
        ref = write_ome_tiff(path, IMG, mpp=0.25, magnification=40)
        return path, ref, dict(vendor="ome-tiff", mpp=0.25, mag=40.0, levels=3, tile=(256, 256))
    if kind == "generic-subifds":
        path = tmp_path / "slide.tif"
        ref = {"levels": write_generic(path, IMG, mpp=0.5, subifds=True)}
        return path, ref, dict(vendor="generic-tiff", mpp=0.5, mag=None, levels=3, tile=(256, 256))
    if kind == "generic-pages":
        path = tmp_path / "slide.tiff"
        ref = {"levels": write_generic(path, IMG, mpp=0.5, subifds=False, compression="zlib")}
        return path, ref, dict(vendor="generic-tiff", mpp=0.5, mag=None, levels=3, tile=(256, 256))
    if kind == "ome-zarr-0.4":
        path = tmp_path / "slide.ome.zarr"
        ref = write_ome_zarr(path, IMG, mpp=0.5, version="0.4")
        return path, ref, dict(vendor="ome-zarr", mpp=0.5, mag=None, levels=3, tile=(256, 256))
    if kind == "ome-zarr-0.5":
        path = tmp_path / "slide.zarr"
        ref = write_ome_zarr(path, IMG, mpp=0.5, version="0.5", chunk=128)
        return path, ref, dict(vendor="ome-zarr", mpp=0.5, mag=None, levels=3, tile=(128, 128))
    raise AssertionError(kind)


KINDS = [
    "svs-jpeg",
    "svs-jpeg2000",
    "ndpi",
    "ome-tiff",
    "generic-subifds",
    "generic-pages",
    "ome-zarr-0.4",
    "ome-zarr-0.5",
]


@pytest.mark.parametrize("kind", KINDS)
def test_format_metadata_and_levels(kind, tmp_path):
    path, ref, expected = _write(kind, tmp_path)
    with open_slide(path) as slide:
        assert slide.vendor == expected["vendor"]
        assert slide.rgb
        assert slide.mpp == pytest.approx((expected["mpp"], expected["mpp"]))
        assert slide.magnification == expected["mag"]
        assert slide.dimensions == (1300, 1000)
        assert slide.level_count == expected["levels"]
        assert slide.tile_shape == expected["tile"]
        for level, reference in zip(slide.levels, ref["levels"], strict=True):
            assert level.shape == reference.shape
            assert level.dtype == np.uint8
        # Levels are chunked at the stored tile size (strips grouped to >= 256 rows).
        chunk_h, chunk_w = slide.levels[0].chunksize[:2]
        assert chunk_w == min(expected["tile"][1], 1300)
        assert chunk_h % expected["tile"][0] == 0 or chunk_h == 1000
        assert [round(i.downsample) for i in slide.level_info] == [
            round(1300 / r.shape[1]) for r in ref["levels"]
        ]


@pytest.mark.parametrize("kind", KINDS)
def test_region_reads_equal_stored_pixels(kind, tmp_path):
    path, ref, _ = _write(kind, tmp_path)
    with open_slide(path) as slide:
        base = ref["levels"][0]
        # Across tile boundaries and up to the right/bottom edges.
        for x, y, w, h in [(0, 0, 300, 200), (250, 240, 270, 300), (1100, 800, 200, 200)]:
            np.testing.assert_array_equal(
                slide.read_region(0, x, y, w, h), base[y : y + h, x : x + w]
            )
        # Whole levels through dask (threaded) equal the file's own decode.
        for index, reference in enumerate(ref["levels"]):
            np.testing.assert_array_equal(
                slide.levels[index].compute(scheduler="threads"), reference
            )
        # A reduced level: the level-0 box maps to the level's pixels.
        level = 1
        ds = slide.level_info[level].downsample
        region = slide.read_region(level, 400, 200, 400, 400)
        y0, x0 = int(200 // ds), int(400 // ds)
        expected = ref["levels"][level][y0 : y0 + region.shape[0], x0 : x0 + region.shape[1]]
        assert region.shape[:2] == (round(400 / ds), round(400 / ds))
        np.testing.assert_array_equal(region, expected)


def test_region_outside_the_slide_is_glass(tmp_path):
    path, ref, _ = _write("generic-subifds", tmp_path)
    slide = open_slide(path)
    region = slide.read_region(0, -50, -20, 100, 60)
    assert region.shape == (60, 100, 3)
    assert (region[:20] == 255).all() and (region[:, :50] == 255).all()
    np.testing.assert_array_equal(region[20:, 50:], ref["levels"][0][:40, :50])
    assert (slide.read_region(0, 5000, 5000, 10, 10) == 255).all()
    with pytest.raises(ValueError, match="level 7 does not exist"):
        slide.read_region(7, 0, 0, 10, 10)
    with pytest.raises(ValueError, match="positive"):
        slide.read_region(0, 0, 0, 0, 10)


def test_level_for_picks_the_coarsest_level_not_coarser_than_asked(tmp_path):
    path, _, _ = _write("ome-tiff", tmp_path)  # 0.25 µm/px, downsamples 1, 2, 4
    slide = open_slide(path)
    assert slide.level_for(mpp=0.25) == 0
    assert slide.level_for(mpp=0.4) == 0
    assert slide.level_for(mpp=0.5) == 1
    assert slide.level_for(mpp=0.9) == 1
    assert slide.level_for(mpp=8.0) == 2
    assert slide.level_for(downsample=3.9) == 1
    assert slide.level_for(mpp=0.1) == 0
    assert slide.level_mpp(2) == pytest.approx((1.0, 1.0))
    with pytest.raises(ValueError):
        slide.level_for()


def test_associated_images_svs_and_ndpi(tmp_path):
    path, ref, _ = _write("svs-jpeg", tmp_path)
    slide = open_slide(path)
    assert set(slide.associated) == {"thumbnail", "label", "macro"}
    np.testing.assert_array_equal(slide.associated["label"], ref["label"])  # LZW: lossless
    assert slide.associated["macro"].shape == ref["macro"].shape
    assert slide.associated["thumbnail"].shape == ref["thumbnail"].shape
    path, ref, _ = _write("ndpi", tmp_path)
    slide = open_slide(path)
    assert list(slide.associated) == ["macro"]
    assert slide.associated["macro"].shape == ref["macro"].shape


def test_single_level_tiff_gets_lazy_display_levels(tmp_path):
    img = rgb_image(4200, 2600, seed=3)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(
        path,
        img,
        tile=(256, 256),
        compression="zlib",
        photometric="rgb",
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    slide = open_slide(path)
    assert [i.virtual for i in slide.level_info] == [False, True, True]
    assert slide.level_info[1].shape == (2100, 1300)
    assert slide.level_info[2].shape == (1050, 650)
    expected = img[:4200, :2600].reshape(2100, 2, 1300, 2, 3).mean(axis=(1, 3))
    got = slide.levels[1][:300, :300].compute()
    assert np.abs(got.astype(float) - expected[:300, :300]).max() <= 0.5 + 1e-6
    region = slide.read_region(2, 0, 0, 400, 400)
    assert region.shape == (100, 100, 3)


def test_missing_mpp_warns_and_override_applies(tmp_path):
    path = tmp_path / "nompp.tif"
    write_generic(path, IMG, mpp=None)
    with pytest.warns(MissingMppWarning, match="nompp.tif"):
        slide = open_slide(path)
    assert slide.mpp is None and slide.mpp_source is None
    with pytest.raises(SlideError, match="mpp"):
        slide.level_for(mpp=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingMppWarning)
        slide = open_slide(path, mpp=0.25, magnification=40)
    assert slide.mpp == (0.25, 0.25) and slide.mpp_source == "override"
    assert slide.magnification == 40
    with pytest.raises(ValueError, match="mpp"):
        open_slide(path, mpp=-1)


def test_implausible_resolution_tags_are_not_taken_as_mpp(tmp_path):
    path = tmp_path / "dpi.tif"
    tifffile.imwrite(
        path,
        IMG,
        tile=(256, 256),
        photometric="rgb",
        resolution=(72, 72),
        resolutionunit="INCH",
        metadata=None,
    )
    with pytest.warns(MissingMppWarning):
        slide = open_slide(path)
    assert slide.mpp is None
    assert any("implausible" in note for note in slide.metadata.get("notes", []))


def test_grayscale_16bit_opens_as_non_rgb(tmp_path):
    path = tmp_path / "gray16.tif"
    data = (np.arange(512 * 768, dtype=np.uint32).reshape(512, 768) % 4000).astype(np.uint16)
    tifffile.imwrite(path, data, tile=(256, 256), metadata=None)
    with pytest.warns(MissingMppWarning):
        slide = open_slide(path)
    assert not slide.rgb and slide.channels == 1 and slide.dtype == np.uint16
    np.testing.assert_array_equal(slide.read_region(0, 100, 50, 300, 200), data[50:250, 100:400])
    assert slide.fill_value == 0
    assert any("not an 8-bit RGB" in note for note in slide.notes)


def test_fluorescence_multichannel_opens_channels_last(tmp_path):
    path = tmp_path / "fluo.ome.tif"
    data = write_fluorescence(path, channels=4)
    slide = open_slide(path)
    assert not slide.rgb and slide.channels == 4
    assert slide.levels[0].shape == (300, 400, 4)
    np.testing.assert_array_equal(
        slide.read_region(0, 10, 20, 50, 40), data[:, 20:60, 10:60].transpose(1, 2, 0)
    )
    assert slide.mpp == pytest.approx((0.65, 0.65))


def test_z_stack_is_refused_clearly(tmp_path):
    path = tmp_path / "zstack.ome.tif"
    tifffile.imwrite(path, np.zeros((5, 64, 64), np.uint8), ome=True, metadata={"axes": "ZYX"})
    with pytest.raises(SlideError, match=r"zstack\.ome\.tif: unsupported pixel layout: axes ZYX"):
        open_slide(path)


# -- bad files ------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(SlideError, match=r"nope\.svs: no such file"):
        open_slide(tmp_path / "nope.svs")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.svs"
    path.write_bytes(b"")
    with pytest.raises(SlideError, match=r"empty\.svs: the file is empty"):
        open_slide(path)


def test_not_a_slide(tmp_path):
    path = tmp_path / "photo.tif"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(SlideError, match=r"photo\.tif: not a TIFF-based slide"):
        open_slide(path)


def test_unsupported_vendor_format_is_named(tmp_path):
    path = tmp_path / "scan.mrxs"
    path.write_bytes(b"x")
    with pytest.raises(SlideError, match="MIRAX files are not supported"):
        open_slide(path)


def test_directory_that_is_not_ome_zarr(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(SlideError, match="folder"):
        open_slide(tmp_path / "folder")
    import zarr

    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(SlideError, match="no 'multiscales' metadata"):
        open_slide(tmp_path / "plain.zarr")


def test_truncated_header_fails_at_open(tmp_path):
    path = tmp_path / "cut.svs"
    write_svs(path, IMG)
    path.write_bytes(path.read_bytes()[:6])
    with deadline(10), pytest.raises(SlideError, match=r"cut\.svs"):
        open_slide(path)


def test_truncated_file_raises_at_read_with_the_tile(tmp_path):
    path = tmp_path / "cut.tif"
    write_generic(path, IMG, mpp=0.5, subifds=True)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        cut = int(page.dataoffsets[6]) + 10  # inside level-0 tile 6 = (row 1, column 1)
    path.write_bytes(path.read_bytes()[:cut])
    with deadline(10):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MissingMppWarning)
            slide = open_slide(path)
        # Tiles before the cut still read.
        assert slide.read_region(0, 0, 0, 256, 256).shape == (256, 256, 3)
        with pytest.raises(
            SlideError, match=r"cut\.tif: truncated file: level 0 tile \(row 1, column 1\)"
        ):
            slide.read_region(0, 300, 300, 50, 50)
        with pytest.raises(SlideError, match="truncated"):
            slide.levels[0][256:512, 256:512].compute()


def test_corrupt_tile_raises_with_its_position(tmp_path):
    path = tmp_path / "bad.svs"
    write_svs(path, IMG)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = (
            int(page.dataoffsets[8]),
            int(page.databytecounts[8]),
        )  # 6 per row: row 1, col 2
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(count)
    path.write_bytes(bytes(data))
    slide = open_slide(path)
    with deadline(10):
        with pytest.raises(
            SlideError, match=r"bad\.svs: corrupt image data: level 0 tile \(row 1, column 2\)"
        ):
            slide.read_region(0, 0, 0, 1300, 1000)
        with pytest.raises(SlideError, match=r"row 1, column 2"):
            slide.levels[0].compute()
    # The rest of the slide still reads.
    assert slide.read_region(0, 0, 0, 256, 256).shape == (256, 256, 3)


def test_garbage_after_a_valid_header_fails_quickly(tmp_path):
    path = tmp_path / "garbage.ndpi"
    rng = np.random.default_rng(0)
    path.write_bytes(b"II*\x00" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with deadline(10), pytest.raises(SlideError, match=r"garbage\.ndpi"):
        open_slide(path)


def test_tiny_tiles_are_grouped_into_larger_chunks(tmp_path):
    """16 px tiles would make a dask chunk per 256 px² (millions on a slide)."""
    path = tmp_path / "tiny.tif"
    img = rgb_image(700, 600, seed=5)
    tifffile.imwrite(path, img, tile=(16, 16), photometric="rgb", metadata=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingMppWarning)
        slide = open_slide(path)
    assert slide.tile_shape == (16, 16)
    assert slide.levels[0].chunksize == (256, 256, 3)
    np.testing.assert_array_equal(slide.levels[0].compute(), img)
    np.testing.assert_array_equal(slide.read_region(0, 250, 300, 100, 40), img[300:340, 250:350])


def test_ndpi_restart_intervals_read_as_tiles(tmp_path):
    """Hamamatsu's large levels: one JPEG strip whose McuStarts tifffile reads as tiles."""
    path = tmp_path / "restart.ndpi"
    reference = write_ndpi_restart_tiles(path, IMG[:512, :768])
    slide = open_slide(path)
    assert slide.vendor == "hamamatsu" and slide.tile_shape == (8, 768)
    np.testing.assert_array_equal(slide.levels[0].compute(), reference)
    np.testing.assert_array_equal(
        slide.read_region(0, 100, 200, 300, 50), reference[200:250, 100:400]
    )
