"""Damaged and absurd slides: one clean SlideError naming the file, never blank glass.

The cases of issue 15: a slide cut inside its tile offsets, sizes of 10⁹ or 0, a FIFO,
OpenSlide's ``unopenable.tiff`` (an unknown compression), a 1 px slide, slides the models
cannot read (grey, 16-bit, float, 2 and 1000 channels), and metadata strings that do not
parse. tests/slide/test_fuzz_tiff.py throws random ones of each kind.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import tifffile

from napari_slide_attention.slide.reader import MissingMppWarning, SlideError, open_slide
from napari_slide_attention.slide.tissue import tissue_mask
from slide_files import (
    deadline,
    raw_rgb_tiff,
    rgb_image,
    write_generic,
    write_ome_tiff,
    write_ome_zarr,
    write_svs,
)

IMG = rgb_image(600, 700, seed=4)


def _open(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingMppWarning)
        return open_slide(path, **kwargs)


def _tag_span(path, page_index: int, code: int) -> tuple[int, int]:
    """(start, stop) of a tag's values in the file."""
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[page_index].tags[code]
        return tag.valueoffset, tag.valueoffset + tag.valuebytecount


# -- tile offsets and byte counts -------------------------------------------------------------


def test_a_slide_cut_inside_its_tile_offsets_is_refused_at_open(tmp_path):
    """Cut there, tifffile loses the offsets and every tile would read as white glass."""
    intact = tmp_path / "intact.svs"
    write_svs(intact, IMG)
    data = intact.read_bytes()
    start, stop = _tag_span(intact, 0, 324)  # TileOffsets of level 0
    path = tmp_path / "cut.svs"
    for cut in range(start, stop, max(1, (stop - start) // 40)):
        path.write_bytes(data[:cut])
        with pytest.raises(SlideError, match=r"cut\.svs: truncated or damaged TIFF: .*level 0"):
            _open(path)
    # Cut after the first tile, the slide opens, notes the cut, and each tile reads as
    # stored or fails when read: never as blank glass.
    with tifffile.TiffFile(intact) as tif:
        cut = int(tif.pages[0].dataoffsets[0] + tif.pages[0].databytecounts[0])
    path.write_bytes(data[:cut])
    slide = _open(path)
    assert any("beyond the end of the file" in note for note in slide.notes)
    stored = open_slide(intact).read_region(0, 0, 0, 256, 256)  # JPEG: as the file decodes
    np.testing.assert_array_equal(slide.read_region(0, 0, 0, 256, 256), stored)
    with pytest.raises(SlideError, match=r"cut\.svs: truncated file: level 0 tile"):
        slide.read_region(0, 256, 256, 256, 256)
    with pytest.raises(SlideError, match=r"cut\.svs: truncated file"):
        tissue_mask(slide)


def test_tile_offsets_into_the_header_are_refused(tmp_path):
    path = tmp_path / "zeros.tif"
    path.write_bytes(raw_rgb_tiff(64, 64, offsets=[0] * 16))
    with pytest.raises(SlideError, match=r"zeros\.tif: damaged TIFF: level 0 tile 0 .*header"):
        _open(path)


def test_fewer_offsets_than_tiles_are_refused(tmp_path):
    path = tmp_path / "few.tif"
    path.write_bytes(raw_rgb_tiff(64, 64, offsets=[8] * 3, counts=[768] * 3))
    with pytest.raises(SlideError, match=r"few\.tif: .*needs 16 tiles but its directory lists 3"):
        _open(path)
    path.write_bytes(raw_rgb_tiff(64, 64, counts=None))
    with pytest.raises(SlideError, match=r"few\.tif: .*has no tile byte counts"):
        _open(path)


def test_tiles_a_file_does_not_store_read_as_glass_and_are_noted(tmp_path):
    """Sparse tiles (offset and byte count 0, as tifffile and GDAL write blank tiles)."""
    path = tmp_path / "sparse.tif"
    tiles = [IMG[:32, :32], None, IMG[32:64, :32], IMG[32:64, 32:64]]
    tifffile.imwrite(
        path, iter(tiles), shape=(64, 64, 3), dtype=np.uint8, tile=(32, 32), photometric="rgb"
    )
    slide = _open(path)
    assert "1 of 4 tiles of level 0 are not stored and read as blank" in slide.notes
    pixels = slide.read_region(0, 0, 0, 64, 64)
    assert (pixels[:32, 32:] == 255).all()
    np.testing.assert_array_equal(pixels[32:], IMG[32:64, :64])
    # A level that stores no tile at all is not a blank slide but a damaged one.
    path.write_bytes(raw_rgb_tiff(64, 64, counts=[0] * 16))
    with pytest.raises(SlideError, match=r"sparse\.tif: damaged TIFF: level 0 stores no image"):
        _open(path)


def test_a_damaged_lower_level_is_dropped_and_level_0_still_reads(tmp_path):
    path = tmp_path / "pyramid.tif"
    write_generic(path, IMG, mpp=0.5, subifds=False, compression="zlib")
    start, stop = _tag_span(path, 1, 324)
    data = bytearray(path.read_bytes())
    data[start:stop] = bytes(stop - start)  # level 1's tile offsets: 0 with byte counts
    path.write_bytes(bytes(data))
    slide = _open(path)
    assert [info.virtual for info in slide.level_info] == [False]
    assert any(note.startswith("level 1 and below ignored: damaged TIFF") for note in slide.notes)
    np.testing.assert_array_equal(slide.levels[0].compute(), IMG)


def test_a_damaged_label_image_is_left_out_and_the_slide_opens(tmp_path):
    path = tmp_path / "label.svs"
    write_svs(path, IMG)
    with tifffile.TiffFile(path, mode="r+") as tif:
        label = next(p for p in tif.pages if "label" in p.description)
        label.tags["ImageWidth"].overwrite(10**9)
    slide = open_slide(path)
    assert "label" not in slide.associated and "macro" in slide.associated
    assert any(note.startswith("label image ignored: damaged") for note in slide.notes)


# -- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "problem"),
    [
        ({256: (4, 10**9)}, "claims 1000000000 x 64 px .* a file of 12568 bytes"),
        ({257: (4, 10**9)}, "claims 64 x 1000000000 px"),
        ({256: (4, 0)}, "level 0 has width 0"),
        ({257: (9, -64)}, "level 0 has height -64"),
        ({322: (4, 0)}, "level 0 has tile width 0"),
        ({323: (4, 0)}, "level 0 has tile height 0"),
        ({322: (4, 2**16), 323: (4, 2**16)}, "one tile of level 0 decodes to 12288 MiB"),
        ({262: (3, 65535)}, "level 0 has photometric interpretation 65535"),
    ],
)
def test_absurd_tags_are_refused_before_anything_is_built(tmp_path, tags, problem):
    path = tmp_path / "absurd.tif"
    path.write_bytes(raw_rgb_tiff(64, 64, extra_tags=tags))
    with deadline(10), pytest.raises(SlideError, match=rf"absurd\.tif: .*{problem}"):
        _open(path)


def test_unknown_compression_is_refused_at_open_without_an_mpp_warning(tmp_path):
    """OpenSlide's unopenable.tiff: 1 x 1 px in a 512 px tile of compression 52479."""
    path = tmp_path / "unopenable.tiff"
    path.write_bytes(
        raw_rgb_tiff(1, 1, tile=None, extra_tags={259: (3, 52479), 322: (4, 512), 323: (4, 512)})
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SlideError, match=r"unopenable\.tiff: unsupported TIFF: .*52479"):
            open_slide(path)
    assert not [w for w in caught if issubclass(w.category, MissingMppWarning)]


def test_a_one_pixel_slide_opens_and_has_a_tissue_mask(tmp_path):
    path = tmp_path / "dot.tif"
    path.write_bytes(raw_rgb_tiff(1, 1, tile=None, pixels=np.full((1, 1, 3), 200, np.uint8)))
    slide = _open(path)
    assert slide.dimensions == (1, 1)
    mask = tissue_mask(slide)
    assert mask.mask.shape == (1, 1)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_opening_it(tmp_path):
    path = tmp_path / "pipe.svs"
    os.mkfifo(path)
    with deadline(10), pytest.raises(SlideError, match=r"pipe\.svs: not a regular file \(a FIFO\)"):
        open_slide(path)


# -- slides the models cannot read --------------------------------------------------------------


def _grey(path):
    tifffile.imwrite(path, IMG[..., 1], tile=(256, 256), metadata=None)


def _rgb16(path):
    tifffile.imwrite(path, IMG.astype(np.uint16) * 257, tile=(256, 256), photometric="rgb")


def _float(path):
    tifffile.imwrite(path, IMG[..., 0].astype(np.float32), tile=(256, 256), metadata=None)


def _two(path):
    tifffile.imwrite(path, IMG[..., :2], tile=(256, 256), photometric="minisblack", planarconfig=1)


def _thousand(path):
    data = np.zeros((1000, 32, 32), np.uint8)
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX"})


@pytest.mark.parametrize(
    ("write", "kind", "tissue"),
    [
        (_grey, "a grey slide of uint8", None),
        (_rgb16, "an RGB slide of uint16", "this is an RGB slide of uint16"),
        (_float, "a grey slide of float32", "float images must be in"),
        (_two, "a 2-channel slide of uint8", "this is a 2-channel slide of uint8"),
        (_thousand, "a 1000-channel slide of uint8", "this is a 1000-channel slide"),
    ],
)
def test_slides_the_models_cannot_read_are_named(tmp_path, write, kind, tissue):
    path = tmp_path / "odd.ome.tif"
    write(path)
    slide = _open(path)
    assert not slide.rgb
    with pytest.raises(SlideError) as raised:
        slide.require_rgb()
    assert str(raised.value) == f"{path}: {kind}; the models read 8-bit RGB brightfield slides"
    if tissue is None:  # grey brightfield: tissue detection works on optical density
        assert tissue_mask(slide).mask.ndim == 2
    else:
        with pytest.raises(SlideError, match=rf"odd\.ome\.tif: tissue detection .*{tissue}"):
            tissue_mask(slide)


def test_require_rgb_passes_an_rgb_slide(tmp_path):
    path = tmp_path / "slide.svs"
    write_svs(path, IMG)
    open_slide(path).require_rgb()


# -- metadata strings ---------------------------------------------------------------------------


def _aperio(path, mpp: str, mag: str) -> None:
    write_svs(path, IMG)
    with tifffile.TiffFile(path, mode="r+") as tif:
        description = tif.pages[0].description
        description = description.replace("MPP = 0.499", f"MPP = {mpp}")
        description = description.replace("AppMag = 20", f"AppMag = {mag}")
        tif.pages[0].tags["ImageDescription"].overwrite(description.encode())


def _json(path, value: str) -> None:
    description = '{"mpp": ' + value + ', "magnification": "high"}'
    write_generic(path, IMG, description=description, compression="zlib")


def _ome(path, size: str) -> None:
    write_ome_tiff(path, IMG, mpp=0.25, magnification=40)
    with tifffile.TiffFile(path, mode="r+") as tif:
        xml = tif.ome_metadata.replace('PhysicalSizeX="0.25"', f'PhysicalSizeX="{size}"')
        xml = xml.replace('NominalMagnification="40"', 'NominalMagnification="xx"')
        tif.pages[0].tags["ImageDescription"].overwrite(xml.encode())


@pytest.mark.parametrize(
    ("name", "write", "unreadable"),
    [
        ("mag.svs", lambda p: _aperio(p, "0.499", "xx"), "Aperio AppMag 'xx'"),
        ("mpp.svs", lambda p: _aperio(p, "abcdef", "20"), "Aperio MPP 'abcdef'"),
        ("list.tif", lambda p: _json(p, "[0.5]"), "description mpp [0.5]"),
        ("null.tif", lambda p: _json(p, "null"), "description mpp None"),
        ("size.ome.tif", lambda p: _ome(p, "abc"), "OME PhysicalSizeX 'abc'"),
    ],
)
def test_an_unreadable_metadata_string_is_noted_and_the_slide_opens(
    tmp_path, name, write, unreadable
):
    path = tmp_path / name
    write(path)
    if "mag" in name:
        slide = open_slide(path)
        assert slide.mpp == pytest.approx((0.499, 0.499)) and slide.magnification is None
    else:
        with pytest.warns(MissingMppWarning, match="no usable pixel size"):
            slide = open_slide(path)
        assert slide.mpp is None
    assert any(unreadable in note for note in slide.metadata["notes"])
    assert any(unreadable in note for note in slide.describe()["notes"])  # `info` shows it
    np.testing.assert_array_equal(slide.read_region(0, 0, 0, 256, 256)[..., 0] > 0, True)


def _zarr_with(tmp_path, change) -> object:
    path = tmp_path / "slide.ome.zarr"
    write_ome_zarr(path, IMG, version="0.4")
    attrs = json.loads((path / ".zattrs").read_text())
    change(attrs["multiscales"][0], attrs)
    (path / ".zattrs").write_text(json.dumps(attrs))
    return path


def _scale(value):
    def change(ms, _attrs):
        ms["datasets"][0]["coordinateTransformations"][0]["scale"] = value

    return change


@pytest.mark.parametrize("scale", [[1.0, None, 0.5], [0.5], "abc"])
def test_an_unreadable_ome_zarr_scale_is_noted_and_the_slide_opens(tmp_path, scale):
    path = _zarr_with(tmp_path, _scale(scale))
    with pytest.warns(MissingMppWarning, match="no usable pixel size"):
        slide = open_slide(path)
    assert any("ignored unreadable OME-Zarr scale" in note for note in slide.notes)
    np.testing.assert_array_equal(slide.read_region(0, 0, 0, 300, 200), IMG[:200, :300])


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda ms, attrs: attrs.update(multiscales={"0": ms}), "'multiscales' is not a list"),
        (lambda ms, _: ms["datasets"][0].pop("path"), "a dataset has no 'path'"),
        (lambda ms, _: ms.update(axes=[{"name": "y"}, {"name": "x"}]), "2 axes \\(YX\\)"),
        (lambda ms, _: ms.update(axes=[1, None, {}]), "axis 1 has no name"),
    ],
)
def test_damaged_ome_zarr_metadata_is_refused(tmp_path, change, problem):
    path = _zarr_with(tmp_path, change)
    with pytest.raises(SlideError, match=rf"slide\.ome\.zarr: damaged OME-Zarr.*{problem}"):
        open_slide(path)


def test_an_ome_zarr_of_absurd_size_or_without_data_is_refused(tmp_path):
    import zarr

    for shape, chunks, problem in [
        ((3, 10**9, 10**9), (3, 512, 512), "3814697265625 chunks"),
        ((3, 4096, 4096), (3, 1, 1), "16777216 chunks"),
        ((3, 64, 64), (3, 64, 64), "level 0 stores no chunks"),
    ]:
        path = tmp_path / f"{shape[1]}-{chunks[1]}.ome.zarr"
        root = zarr.open_group(path, mode="w", zarr_format=2)
        root.create_array("0", shape=shape, chunks=chunks, dtype="u1")
        axes = [{"name": "c"}, {"name": "y"}, {"name": "x"}]
        root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [{"path": "0"}]}]
        with deadline(10), pytest.raises(SlideError, match=rf"{path.name}: .*{problem}"):
            _open(path)


# -- the CLI and the napari reader ----------------------------------------------------------------


def test_the_cli_says_what_is_wrong_in_one_line_and_exits_2(tmp_path, capsys):
    from napari_slide_attention.cli import main

    cut = tmp_path / "cut.svs"
    write_svs(cut, IMG)
    start, _ = _tag_span(cut, 0, 324)
    cut.write_bytes(cut.read_bytes()[: start + 10])
    huge = tmp_path / "huge.tif"
    huge.write_bytes(raw_rgb_tiff(64, 64, extra_tags={256: (4, 10**9)}))
    for path, problem in [(cut, "truncated or damaged TIFF"), (huge, "claims 1000000000 x 64")]:
        assert main(["info", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert err.startswith(f"slide-attention: error: {path}: ") and problem in err


def test_the_napari_reader_takes_a_damaged_svs_and_raises_its_slide_error(tmp_path):
    from napari_slide_attention._napari.reader import get_reader

    path = tmp_path / "cut.svs"
    write_svs(path, IMG)
    start, _ = _tag_span(path, 0, 324)
    path.write_bytes(path.read_bytes()[: start + 10])
    reader = get_reader(str(path))
    assert reader is not None
    with pytest.raises(SlideError, match=r"cut\.svs: truncated or damaged TIFF"):
        reader(str(path))
    plain = tmp_path / "cut.tif"  # a .tif that fails is left to other readers
    plain.write_bytes(path.read_bytes())
    assert get_reader(str(plain)) is None
