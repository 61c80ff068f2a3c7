"""The main job: a sample slide in napari with its tissue, truth and a model's attention.

A small grid-attention model is trained once on a few synthetic slides (cached under
the output folder; a few minutes on a laptop CPU) and run on the sample slide; its
attention maps are shown over the slide, ordered by their weight in the predicted
class. With ``headless=True`` the same steps write screenshots and a short Markdown
report instead of leaving a window open.
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
from .layers import attention_layer_data, slide_scale

# The demo model: small enough to train in a few minutes on 2 CPU cores.
DEMO_TRAINING = {
    "epochs": 6,
    "tile_um": 64.0,
    "input_px": 64,
    "n_maps": 16,
    "chunk_tiles": 128,
    "lesion_labels": False,
}
DEMO_COHORT = {"slides_per_class": {"train": 3, "val": 1}, "size": (3072, 2048), "n_pieces": 1}


def demo_model(out: Path, log=print) -> Path:
    """Train (once) the demo's small grid-attention model; returns its checkpoint."""
    from ..progress import run_to_end
    from ..train.cohort import make_synthetic_cohort
    from ..train.grid import GridTrainSettings, train_grid

    run = out / "model"
    best = run / "best.safetensors"
    done = run / "done"
    if best.exists() and done.exists():
        return best
    cohort = make_synthetic_cohort(out / "cohort", seed=1, **DEMO_COHORT)

    def show(event) -> None:
        if event.stage in ("epoch", "calibrate"):
            log(f"demo model: {event.message}")

    run_to_end(train_grid(cohort, run, GridTrainSettings(**DEMO_TRAINING)), show)
    done.write_text("trained\n")
    return best


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

    from ..inference import predict
    from ..progress import run_to_end

    start = time.perf_counter()
    checkpoint = demo_model(out)
    timings["train demo model (s, cached after the first run)"] = time.perf_counter() - start
    start = time.perf_counter()
    result = run_to_end(predict(checkpoint, slide))
    result.save(out / "result")
    timings["predict (s)"] = time.perf_counter() - start

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
        units=units,
    )
    viewer.add_shapes(
        _boxes_to_rectangles([lesion["box"] for lesion in truth["lesions"]], scale),
        shape_type="rectangle",
        edge_color="yellow",
        face_color="transparent",
        edge_width=8 * scale[0],
        name="lesions (truth)",
        units=units,
        features={"class": [lesion["class"] for lesion in truth["lesions"]]},
    )
    data, attention_kwargs, _ = attention_layer_data(result, scale, units)
    viewer.add_image(data, **attention_kwargs)
    viewer.dims.set_current_step(0, 0)  # the map with the most weight in the call
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
        f"- demo model (grid attention, {DEMO_TRAINING['epochs']} epochs on "
        f"{4 * DEMO_COHORT['slides_per_class']['train']} synthetic slides, slide labels only):"
        f" `{checkpoint}`",
        f"- prediction: **{result.predicted_class}** ({result.confidence:.0%}); "
        + ", ".join(
            f"{c} {p:.0%}" for c, p in zip(result.classes, result.probabilities, strict=True)
        )
        + f"; {result.info['tiles']} tiles on {result.info['device']}",
        f"- attention maps: {attention_kwargs['name']}, strongest maps first "
        f"(original numbers {attention_kwargs['metadata']['map_order'][:5]} ...)",
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
        json.dumps(
            {
                "slide": facts,
                "truth": truth,
                "layers": layers,
                "timings": timings,
                "prediction": {
                    "class": result.predicted_class,
                    "probabilities": dict(
                        zip(result.classes, map(float, result.probabilities), strict=True)
                    ),
                    "checkpoint": str(checkpoint),
                },
            },
            indent=2,
        )
    )
    print(f"demo: wrote {report} and {len(shots)} screenshot(s) in {out}")
    return 0
