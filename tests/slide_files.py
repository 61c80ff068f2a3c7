"""Writers of small slides in every supported format, with vendor-like metadata.

Each writer returns the per-level reference pixels as the file's own decoder gives
them (``references``), so tests compare reads against exactly what is stored even
for lossy codecs.
"""

from __future__ import annotations

import json
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile
import zarr

APERIO_HEADER = "Aperio Image Library v12.0.15 \r\n"


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: a malformed file must fail within seconds (the cases that
    use this hang, if at all, in Python code, where SIGALRM reaches them)."""

    def alarm(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def rgb_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A tissue-like RGB image: pink blobs with dark dots on near-white glass."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.full((height, width, 3), 235, np.float32)
    for _ in range(3):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.1, 0.25) * height, rng.uniform(0.1, 0.25) * width
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        img[inside] = (215, 130, 175)
    img += rng.normal(0, 8, img.shape)
    img += 20 * np.sin(xx / 17.0)[..., None] * np.cos(yy / 23.0)[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def pyramid(img: np.ndarray, factors: list[int]) -> list[np.ndarray]:
    """Mean-downsampled copies of an image (levels below level 0)."""
    out = []
    for f in factors:
        h, w = img.shape[0] // f, img.shape[1] // f
        small = img[: h * f, : w * f].reshape(h, f, w, f, -1).mean(axis=(1, 3))
        out.append(small.astype(np.uint8))
    return out


def _references(path: Path, series_index: int = 0) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [level.asarray() for level in tif.series[series_index].levels]


def write_generic(
    path,
    img,
    *,
    factors=(2, 4),
    tile=256,
    compression="jpeg",
    subifds=True,
    mpp=None,
    description=None,
) -> list[np.ndarray]:
    """Generic pyramidal TIFF, levels in SubIFDs or as pages; resolution tags give mpp."""
    levels = [img, *pyramid(img, list(factors))]
    resolution = {}
    with tifffile.TiffWriter(path) as tif:
        for index, level in enumerate(levels):
            if mpp is not None:
                f = img.shape[1] / level.shape[1]
                resolution = {
                    "resolution": (1e4 / (mpp * f), 1e4 / (mpp * f)),
                    "resolutionunit": "CENTIMETER",
                }
            kwargs = dict(
                tile=(tile, tile) if tile else None,
                compression=compression,
                photometric="rgb",
                metadata=None,
                **resolution,
            )
            if index == 0:
                if subifds and len(levels) > 1:
                    kwargs["subifds"] = len(levels) - 1
                if description:
                    kwargs["description"] = description
            else:
                kwargs["subfiletype"] = 1
            tif.write(level, **kwargs)
    return _references(path)


def write_svs(path, img, *, compression="jpeg", mpp=0.499, magnification=20) -> dict:
    """Aperio SVS: baseline, thumbnail, reduced levels, label (LZW) and macro (JPEG)."""
    h, w = img.shape[:2]
    base = (
        f"{APERIO_HEADER}{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=70|AppMag = {magnification}"
        f"|StripeWidth = 2040|ScanScope ID = SS1234|Filename = test|Date = 01/02/23"
        f"|Time = 10:00:00|MPP = {mpp}|Left = 25.0|Top = 18.0"
    )
    levels = pyramid(img, [4, 16])
    thumb = pyramid(img, [8])[0]
    label = np.full((120, 300, 3), 250, np.uint8)
    label[40:80, 50:250] = 0
    macro = np.full((160, 480, 3), 200, np.uint8)
    with tifffile.TiffWriter(path) as tif:
        opts = dict(photometric="rgb", metadata=None)
        tif.write(img, tile=(256, 256), compression=compression, description=base, **opts)
        tif.write(
            thumb,
            compression="jpeg",
            description=(
                f"{APERIO_HEADER}{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - "
                f"|AppMag = {magnification}"
            ),
            **opts,
        )
        for level in levels:
            tif.write(
                level,
                tile=(256, 256),
                compression=compression,
                description=f"{APERIO_HEADER}{w}x{h} -> {level.shape[1]}x{level.shape[0]} - ",
                **opts,
            )
        tif.write(
            label,
            compression="lzw",
            description=f"{APERIO_HEADER}label {label.shape[1]}x{label.shape[0]}",
            subfiletype=1,
            **opts,
        )
        tif.write(
            macro,
            compression="jpeg",
            description=f"{APERIO_HEADER}macro {macro.shape[1]}x{macro.shape[0]}",
            subfiletype=9,
            **opts,
        )
    return {"levels": _references(path), "label": label, "macro": macro, "thumbnail": thumb}


def write_ndpi(path, img, *, mpp=0.4416, magnification=20.0) -> dict:
    """Hamamatsu NDPI: JPEG strips per level, Magnification tags, a macro at -1x.

    tifffile writes a classic TIFF; its IFDs are then re-chained in NDPI's layout
    (64-bit next-IFD offsets followed by the high 32 bits of each tag's offset),
    which is what tifffile, OpenSlide and the scanners expect of a .ndpi file.
    """
    path = Path(path)
    classic = path.with_suffix(".classic.tif")
    macro = np.full((150, 400, 3), 180, np.uint8)
    levels = [img, *pyramid(img, [4, 16])]
    with tifffile.TiffWriter(classic) as tif:
        for level in levels:
            f = img.shape[1] / level.shape[1]
            tif.write(
                level,
                compression="jpeg",
                photometric="rgb",
                rowsperstrip=64,
                resolution=(1e4 / (mpp * f), 1e4 / (mpp * f)),
                resolutionunit="CENTIMETER",
                software="NDP.scan 3.4.0",
                extratags=[
                    (271, "s", 0, "Hamamatsu", True),
                    (272, "s", 0, "C13220", True),
                    (65420, "I", 1, 1, True),  # FileFormat
                    (65421, "f", 1, magnification / f, True),  # Magnification
                    (65422, "i", 1, 0, True),  # XOffsetFromSlideCentre
                    (65423, "i", 1, 0, True),  # YOffsetFromSlideCentre
                ],
                metadata=None,
            )
        tif.write(
            macro,
            compression="jpeg",
            photometric="rgb",
            extratags=[
                (271, "s", 0, "Hamamatsu", True),
                (65420, "I", 1, 1, True),
                (65421, "f", 1, -1.0, True),
            ],
            metadata=None,
        )
    _rechain_as_ndpi(classic, path)
    classic.unlink()
    return {"levels": _references(path), "macro": macro}


def write_ndpi_restart_tiles(path, img, *, mpp=0.5) -> np.ndarray:
    """NDPI whose level is one JPEG with a restart marker per row of MCUs and an NDPI
    McuStarts tag, as Hamamatsu scanners write large levels: tifffile reads its restart
    intervals as tiles. Returns the pixels as the file decodes."""
    import io
    import re

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, "JPEG", quality=90, restart_marker_rows=1, subsampling=0)
    jpeg = buffer.getvalue()
    sos = jpeg.index(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")
    starts = [scan] + [scan + m.end() for m in re.finditer(rb"\xff[\xd0-\xd7]", jpeg[scan:])]
    path = Path(path)
    classic = path.with_suffix(".classic.tif")
    with tifffile.TiffWriter(classic) as tif:
        tif.write(
            iter([jpeg]),
            shape=img.shape,
            dtype=np.uint8,
            compression="jpeg",
            photometric="rgb",
            rowsperstrip=img.shape[0],
            resolution=(1e4 / mpp, 1e4 / mpp),
            resolutionunit="CENTIMETER",
            metadata=None,
            extratags=[
                (271, "s", 0, "Hamamatsu", True),
                (65420, "I", 1, 1, True),  # FileFormat
                (65421, "f", 1, 20.0, True),  # Magnification
                (65426, "I", len(starts), starts, True),  # McuStarts
            ],
        )
    _rechain_as_ndpi(classic, path)
    classic.unlink()
    return _references(path)[0]


def _rechain_as_ndpi(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        offsets = [page.offset for page in tif.pages]
    ifds = []
    for offset in offsets:
        (count,) = struct.unpack_from("<H", data, offset)
        entries = bytes(data[offset + 2 : offset + 2 + 12 * count])
        ifds.append((count, entries))
    out = data
    positions = []
    cursor = len(out) + (-len(out)) % 8
    for count, _entries in ifds:
        positions.append(cursor)
        cursor += 2 + 12 * count + 8 + 4 * count
        cursor += (-cursor) % 8
    out += b"\0" * (positions[0] - len(out))
    for i, (count, entries) in enumerate(ifds):
        nxt = positions[i + 1] if i + 1 < len(ifds) else 0
        block = struct.pack("<H", count) + entries + struct.pack("<Q", nxt) + b"\0" * (4 * count)
        out += block
        if i + 1 < len(ifds):
            out += b"\0" * (positions[i + 1] - len(out))
    out[4:12] = struct.pack("<Q", positions[0])
    dst.write_bytes(bytes(out))


def write_ome_tiff(path, img, *, mpp=0.25, magnification=None, compression="jpeg") -> dict:
    """OME-TIFF with the pyramid in SubIFDs and PhysicalSize in µm."""
    levels = [img, *pyramid(img, [2, 4])]
    metadata = {
        "axes": "YXS",
        "PhysicalSizeX": mpp,
        "PhysicalSizeY": mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeYUnit": "µm",
    }
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(
            levels[0],
            tile=(256, 256),
            compression=compression,
            photometric="rgb",
            subifds=len(levels) - 1,
            metadata=metadata,
        )
        for level in levels[1:]:
            tif.write(
                level, tile=(256, 256), compression=compression, photometric="rgb", subfiletype=1
            )
    if magnification:
        # Add an Instrument/Objective to the OME-XML the way scanners' converters do.
        with tifffile.TiffFile(path, mode="r+") as tif:
            xml = tif.ome_metadata
            instrument = (
                '<Instrument ID="Instrument:0"><Objective ID="Objective:0:0" '
                f'NominalMagnification="{magnification}"/></Instrument>'
            )
            xml = xml.replace("<Image ", instrument + "<Image ", 1)
            tif.pages[0].tags["ImageDescription"].overwrite(xml.encode())
    return {"levels": _references(path)}


def write_ome_zarr(path, img, *, mpp=0.5, version="0.4", chunk=256, unit="micrometer") -> dict:
    """OME-Zarr (NGFF 0.4 on zarr v2, or 0.5 on zarr v3), axes c, y, x."""
    levels = [img, *pyramid(img, [2, 4])]
    zarr_format = 2 if version == "0.4" else 3
    root = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    datasets = []
    for index, level in enumerate(levels):
        cyx = np.ascontiguousarray(level.transpose(2, 0, 1))
        arr = root.create_array(str(index), shape=cyx.shape, chunks=(3, chunk, chunk), dtype="u1")
        arr[...] = cyx
        f = img.shape[1] / level.shape[1]
        datasets.append(
            {
                "path": str(index),
                "coordinateTransformations": [{"type": "scale", "scale": [1.0, mpp * f, mpp * f]}],
            }
        )
    axes = [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", **({"unit": unit} if unit else {})},
        {"name": "x", "type": "space", **({"unit": unit} if unit else {})},
    ]
    multiscales = [{"version": version, "name": "slide", "axes": axes, "datasets": datasets}]
    if version == "0.4":
        root.attrs["multiscales"] = multiscales
    else:
        root.attrs["ome"] = {"version": version, "multiscales": multiscales}
    return {"levels": levels}


def write_sidecar_json(path, payload) -> None:
    Path(f"{path}.json").write_text(json.dumps(payload))


def write_fluorescence(path, channels: int = 3, *, mpp=0.65) -> np.ndarray:
    """A 16-bit multichannel OME-TIFF (C, Y, X) as fluorescence scanners write; returns it."""
    data = np.random.default_rng(0).integers(0, 4000, (channels, 300, 400)).astype(np.uint16)
    tifffile.imwrite(
        path,
        data,
        tile=(128, 128),
        ome=True,
        metadata={"axes": "CYX", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp},
    )
    return data


# -- raw TIFF files, tag by tag, for damaged and absurd slides -----------------------------

# TIFF field types: code -> (struct format, size of one value).
_TIFF_TYPES = {
    1: ("B", 1),  # BYTE
    2: ("s", 1),  # ASCII
    3: ("H", 2),  # SHORT
    4: ("I", 4),  # LONG
    5: ("II", 8),  # RATIONAL (numerator, denominator)
    8: ("h", 2),  # SSHORT
    9: ("i", 4),  # SLONG
    11: ("f", 4),  # FLOAT
    12: ("d", 8),  # DOUBLE
}


def raw_tiff(pages: list[dict]) -> bytes:
    """A classic little-endian TIFF holding exactly the tags given, however absurd.

    tifffile's writer checks what it writes; this writes what it is told, so tests can
    make files with zero, huge or inconsistent sizes, offsets and byte counts.

    Each page is a dict: ``tags``, tag code -> (field type, value or list of values;
    str or bytes for ASCII; (numerator, denominator) pairs for RATIONAL);
    ``segments``, the bytes of its tiles or strips, written at the start of the file
    after the header; ``offsets`` and ``counts``, lists that replace the true tile
    offsets and byte counts (default: where ``segments`` were written and their
    lengths); ``tiled`` (default: whether tag 322 TileWidth is among the tags), which
    picks tags 324/325 over 273/279 for them; ``next``, an offset that replaces the true
    next-directory offset (e.g. its own, a loop).
    """
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    placed = []
    for page in pages:
        offsets, counts = [], []
        for segment in page.get("segments", ()):
            offsets.append(len(out))
            counts.append(len(segment))
            out += segment
        placed.append((page.get("offsets", offsets), page.get("counts", counts)))
    ifd_offsets = []
    for page, (offsets, counts) in zip(pages, placed, strict=True):
        tags = dict(page["tags"])
        tiled = page.get("tiled", 322 in tags)
        if offsets is not None:
            tags[324 if tiled else 273] = (4, list(offsets))
        if counts is not None:
            tags[325 if tiled else 279] = (4, list(counts))
        out += b"\0" * (len(out) % 2)
        ifd_offsets.append(len(out))
        entries = sorted(tags.items())
        ifd_size = 2 + 12 * len(entries) + 4
        values_at = len(out) + ifd_size
        ifd = bytearray(struct.pack("<H", len(entries)))
        values = bytearray()
        for code, (kind, value) in entries:
            payload, count = _tiff_values(kind, value)
            if len(payload) <= 4:
                ifd += struct.pack("<HHI", code, kind, count) + payload.ljust(4, b"\0")
            else:
                values += b"\0" * (len(values) % 2)
                ifd += struct.pack("<HHII", code, kind, count, values_at + len(values))
                values += payload
        ifd += b"\0\0\0\0"  # next IFD, patched below
        out += ifd + values
    for i, where in enumerate(ifd_offsets):
        nxt = ifd_offsets[i + 1] if i + 1 < len(ifd_offsets) else 0
        nxt = pages[i].get("next", nxt)
        struct.pack_into("<I", out, where + 2 + 12 * struct.unpack_from("<H", out, where)[0], nxt)
    struct.pack_into("<I", out, 4, ifd_offsets[0] if ifd_offsets else 0)
    return bytes(out)


def _tiff_values(kind: int, value) -> tuple[bytes, int]:
    """The bytes and count of one tag's values."""
    if kind == 2:
        text = value.encode() if isinstance(value, str) else bytes(value)
        text += b"\0"
        return text, len(text)
    values = list(value) if isinstance(value, list | tuple) and kind != 5 else [value]
    if kind == 5:
        pairs = value if isinstance(value, list) else [value]
        return b"".join(struct.pack("<II", *pair) for pair in pairs), len(pairs)
    fmt, _size = _TIFF_TYPES[kind]
    return struct.pack(f"<{len(values)}{fmt}", *values), len(values)


def raw_rgb_tiff(
    width: int,
    height: int,
    *,
    tile: int | None = 16,
    pixels: np.ndarray | None = None,
    extra_tags: dict | None = None,
    **page,
) -> bytes:
    """An uncompressed 8-bit RGB TIFF written by ``raw_tiff``: ``tile`` x ``tile`` tiles,
    or one strip when ``tile`` is None. ``extra_tags`` replace or add tags; ``page`` keys
    (``offsets``, ``counts``, ``next``) replace what ``raw_tiff`` would write.
    """
    if pixels is None:
        pixels = rgb_image(max(height, 1), max(width, 1), seed=3)[:height, :width]
    tags = {
        256: (4, width),
        257: (4, height),
        258: (3, [8, 8, 8]),
        259: (3, 1),
        262: (3, 2),
        277: (3, 3),
        284: (3, 1),
    }
    segments = []
    if tile:
        tags[322], tags[323] = (4, tile), (4, tile)
        for r in range(0, height, tile):
            for c in range(0, width, tile):
                block = np.zeros((tile, tile, 3), np.uint8)
                part = pixels[r : r + tile, c : c + tile]
                block[: part.shape[0], : part.shape[1]] = part
                segments.append(block.tobytes())
    else:
        tags[278] = (4, max(height, 1))
        segments.append(np.ascontiguousarray(pixels).tobytes())
    tags.update(extra_tags or {})
    return raw_tiff([{"tags": tags, "segments": segments, **page}])
