"""The main job: a sample slide opened in napari with its tissue and truth overlays.

With ``headless=True`` the same steps run in a hidden viewer and write screenshots
and a short Markdown report instead of opening a window.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from ..slide.reader import open_slide
from ..slide.synthetic import read_sidecar, write_synthetic_slide
from ..slide.tissue import tile_grid, tissue_mask, tissue_pieces
from .layers import slide_scale


def _boxes_to_rectangles(boxes, scale) -> list[np.ndarray]:
    """Level-0 (x, y, w, h) boxes -> napari rectangles in world (µm) coordinates."""
    sy, sx = scale
    rects = []
    for x, y, w, h in boxes:
        rects.append(np.array([[y, x], [y, x + w], [y + h, x + w], [y + h, x]], float) * [sy, sx])
    return rects


def run_demo(out: Path, headless: bool = False, size: int = 8192) -> int:
    """Write (or reuse) a sample slide, show it in napari; headless: screenshots + report."""
    import napari

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    path = out / f"sample-{size}.tif"
    if not (path.exists() and Path(f"{path}.json").exists()):
        write_synthetic_slide(path, size=(size, size * 3 // 4), label="carcinoma", seed=0)
    truth = read_sidecar(path)
    timings["write sample slide (s)"] = time.perf_counter() - start

    start = time.perf_counter()
    slide = open_slide(path)
    timings["open slide (s)"] = time.perf_counter() - start
    start = time.perf_counter()
    mask = tissue_mask(slide)
    pieces = tissue_pieces(mask, mpp=slide.mpp)
    grid = tile_grid(mask, 256, min_tissue=0.5)
    timings["tissue mask + grid (s)"] = time.perf_counter() - start

    # Shown even headless (on Xvfb): a hidden vispy canvas renders nothing into screenshots.
    viewer = napari.Viewer(title="napari-slide-attention demo", show=True)
    start = time.perf_counter()
    # Through the plugin's reader, as a user's drag and drop would.
    viewer.open(str(path), plugin="napari-slide-attention")
    timings["napari open (s)"] = time.perf_counter() - start
    scale, units = slide_scale(slide)
    viewer.add_labels(
        mask.mask.astype(np.uint8),
        name="tissue",
        scale=(scale[0] * mask.downsample, scale[1] * mask.downsample),
        units=units,
        opacity=0.3,
    )
    viewer.add_shapes(
        _boxes_to_rectangles([p.box for p in pieces], scale),
        shape_type="rectangle",
        edge_color="cyan",
        face_color="transparent",
        edge_width=20 * scale[0],
        name="tissue pieces",
    )
    viewer.add_shapes(
        _boxes_to_rectangles([lesion["box"] for lesion in truth["lesions"]], scale),
        shape_type="rectangle",
        edge_color="yellow",
        face_color="transparent",
        edge_width=8 * scale[0],
        name="lesions (truth)",
        features={"class": [lesion["class"] for lesion in truth["lesions"]]},
    )
    viewer.scale_bar.visible = True
    viewer.reset_view()

    if not headless:
        napari.run()
        return 0

    shots = []
    start = time.perf_counter()
    overview = out / "overview.png"
    viewer.screenshot(str(overview), canvas_only=True, size=(768, 1024))
    shots.append(overview)
    if truth["lesions"]:
        x, y, w, h = truth["lesions"][0]["box"]
        viewer.camera.center = ((y + h / 2) * scale[0], (x + w / 2) * scale[1])
        viewer.camera.zoom = 1.0 / (4 * w * scale[1] / 1024)  # lesion spans ~1/4 of the view
        zoomed = out / "lesion.png"
        viewer.screenshot(str(zoomed), canvas_only=True, size=(768, 1024))
        shots.append(zoomed)
    timings["screenshots (s)"] = time.perf_counter() - start
    layers = [(layer.name, type(layer).__name__) for layer in viewer.layers]
    viewer.close()

    facts = slide.describe()
    report = out / "report.md"
    lines = [
        "# napari-slide-attention demo",
        "",
        f"- slide: `{path}` ({facts['dimensions'][0]} x {facts['dimensions'][1]} px, "
        f"{facts['vendor']}, {len(facts['levels'])} levels, mpp {facts['mpp']}, "
        f"magnification {facts['magnification']})",
        f"- truth: label **{truth['label']}**, {len(truth['lesions'])} lesion(s), "
        f"{len(truth['pieces'])} tissue piece(s)",
        f"- tissue: {mask.fraction:.1%} of the slide in {len(pieces)} piece(s); "
        f"{len(grid)} tiles of 256 px with >= 50% tissue",
        f"- layers: {', '.join(f'{n} ({t})' for n, t in layers)}",
        f"- screenshots: {', '.join(f'`{s.name}`' for s in shots)}",
        f"- machine: {platform.platform()}, Python {platform.python_version()}, "
        f"napari {napari.__version__}",
        "",
        "| step | seconds |",
        "| --- | --- |",
        *[f"| {k} | {v:.2f} |" for k, v in timings.items()],
        "",
    ]
    report.write_text("\n".join(lines))
    (out / "report.json").write_text(
        json.dumps({"slide": facts, "truth": truth, "layers": layers, "timings": timings}, indent=2)
    )
    print(f"demo: wrote {report} and {len(shots)} screenshot(s) in {out}")
    return 0
