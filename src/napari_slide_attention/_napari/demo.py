"""The main job: two sample slides in napari with their tissue, truth and models' views.

Two small models are trained once on a few synthetic slides (cached under the output
folder; a few minutes on a laptop CPU), each on the task of its paper, and run from the
Model panel:

- grid attention (Tomita et al.), trained on H&E needle slides, on the H&E sample: its
  attention maps over the slide, ordered by their weight in the predicted class;
- dual attention (Raza et al.), trained on HER2 IHC slides, on the HER2 sample: the soft
  attention over the low-power view, the tiles sampled where it attends (coloured by
  tile class, numbered by rank) and the hard attention's glimpse paths inside each
  tile; the Tour panel visits the sampled tiles. The report says how many of them lie
  on the tumour (the slide's truth) against tiles drawn uniformly in the tissue.

With ``headless=True`` the same steps write screenshots and a short Markdown report
instead of leaving a window open.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from ..files import atomic_write_text
from ..slide.boxes import box_centres, on_mask
from ..slide.reader import open_slide
from ..slide.synthetic import read_sidecar, sample_slide, tumour_mask_truth, write_synthetic_slide
from ..slide.tissue import tile_grid, tissue_mask, tissue_pieces
from .layers import boxes_to_rectangles, slide_scale

# The demo model: small enough to train in a few minutes on 2 CPU cores.
DEMO_TRAINING = {
    "epochs": 6,
    "chunk_tiles": 128,
    "lesion_labels": False,
    "model": {"tile_um": 64.0, "input_px": 64, "n_maps": 16},
}
DEMO_COHORT = {"slides_per_class": {"train": 3, "val": 1}, "size": (3072, 2048), "n_pieces": 1}
# The demo's dual-attention model: the dual benchmarks' small CPU sizes
# (``train.dual.CPU_PRESET``) with the paper's HER2 sampling, trained jointly
# (L_HA + α^e·L_SA) on a few synthetic HER2 slides, the task the paper judged it on.
# Tiles one attention cell apart (half a tile edge), as in ``benchmarks/dual_ihc.py``:
# a tumour on these small slides holds only a few tiles side by side (docs/models.md).
DEMO_DUAL = {"epochs": 12, "mode": "joint"}
DEMO_DUAL_MODEL = {"min_distance": 1.0}
DEMO_IHC_COHORT = {
    "slides_per_class": {"train": 3, "val": 1},
    "size": (3072, 2048),
    "stain": "her2",
}


def demo_model(out: Path, log=print, kind: str = "grid") -> Path:
    """Train (once) one of the demo's small models, "grid" or "dual"; returns its checkpoint.

    A finished run leaves a ``done`` marker; an interrupted one resumes from its last
    epoch the next time.
    """
    from ..jobs import run_to_end
    from ..train.cohort import make_synthetic_cohort

    run = out / ("model" if kind == "grid" else f"model-{kind}-her2")
    best = run / "best.safetensors"
    done = run / "done"
    if best.exists() and done.exists():
        return best

    def show(event) -> None:
        if event.stage in ("epoch", "calibrate", "resume"):
            log(f"demo {kind} model: {event.message}")

    if kind == "grid":
        from ..train.grid import GridTrainSettings, train_grid

        cohort = make_synthetic_cohort(out / "cohort", seed=1, **DEMO_COHORT)
        training = train_grid(cohort, run, GridTrainSettings.from_dict(DEMO_TRAINING))
    elif kind == "dual":
        from ..models.dual_attention import STAIN_SAMPLING
        from ..train.dual import CPU_PRESET, DualTrainSettings, train_dual

        cohort = make_synthetic_cohort(out / "cohort-her2", seed=1, **DEMO_IHC_COHORT)
        preset = json.loads(json.dumps(CPU_PRESET))
        preset["model"].update({**STAIN_SAMPLING["her2"], **DEMO_DUAL_MODEL})
        settings = DualTrainSettings.from_dict({**preset, **DEMO_DUAL})
        training = train_dual(cohort, run, settings)  # resumes an interrupted run
    else:
        raise ValueError(f"kind must be 'grid' or 'dual', got {kind!r}")
    run_to_end(training, show)
    done.write_text("trained\n")
    return best


PLUGIN = "napari-slide-attention"
# Screenshots of the canvas: (rows, columns) px.
SHOT = (768, 1024)
# The tumour truth is drawn at this downsample (level-0 px per pixel) over the HER2 sample.
TRUTH_DOWNSAMPLE = 8.0
PANELS = ("Slide", "Model", "Review", "Fine-tune", "Tour")


def _wait(condition, timeout: float, what: str) -> None:
    """Process Qt events until ``condition()`` holds (the panels' workers report back
    through the event loop)."""
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > end:
            raise TimeoutError(f"demo: {what} did not finish within {timeout:.0f} s")
        QApplication.processEvents()
        time.sleep(0.02)


def _fit_slide(session, size: tuple[int, int]) -> None:
    """Centre the camera on the slide and zoom so that it fills a screenshot of ``size``
    (rows, columns) px, with a small margin (napari's reset_view leaves room for the
    window's canvas shape, not the screenshot's)."""
    width, height = session.slide.dimensions
    sy, sx = session.scale
    session.camera.center = (height * sy / 2, width * sx / 2)
    session.camera.zoom = 0.95 * min(size[0] / (height * sy), size[1] / (width * sx))


def review_cohort(out: Path, sample: Path, label: str) -> Path:
    """A cohort CSV for the Review panel: the demo's training slides and the sample slide
    (as a test slide), so every slide on show has a label set and a label store."""
    from ..train.cohort import CohortEntry, make_synthetic_cohort, write_cohort

    cohort = make_synthetic_cohort(out / "cohort", seed=1, **DEMO_COHORT)
    cohort.entries.append(CohortEntry(sample, cohort.classes.index(label), "test", lesions=None))
    return write_cohort(out / "review-cohort.csv", cohort)


def run_demo(out: Path, headless: bool = False, size: int = 8192) -> int:
    """Write (or reuse) a sample slide and open it in napari with all five panels: the
    grid model runs from the Model panel, the dual model's view is added beside it, the
    Review panel accepts the label, the Tour panel takes the first stop. Headless:
    screenshots of the canvas and of each panel, and a report."""
    import napari
    from napari.utils.colormaps import DirectLabelColormap

    from .session import session_for

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

    start = time.perf_counter()
    checkpoint = demo_model(out)
    timings["train demo model (s, cached after the first run)"] = time.perf_counter() - start

    start = time.perf_counter()
    dual_checkpoint = demo_model(out, kind="dual")
    timings["train dual demo model (s, cached after the first run)"] = time.perf_counter() - start
    start = time.perf_counter()
    ihc_path = sample_slide(out, stain="her2")
    ihc_truth = read_sidecar(ihc_path)
    timings["write HER2 sample slide (s)"] = time.perf_counter() - start
    cohort_csv = review_cohort(out, path, truth["label"])

    # Shown even headless (on Xvfb): a hidden vispy canvas renders nothing into screenshots.
    viewer = napari.Viewer(title="napari-slide-attention demo", show=True)
    panels = {name: viewer.window.add_plugin_dock_widget(PLUGIN, name)[1] for name in PANELS}
    session = session_for(viewer)
    panels["Slide"].open_cohort(cohort_csv)
    start = time.perf_counter()
    # Through the plugin's reader, as a user's drag and drop would; the session adopts it.
    viewer.open(str(path), plugin=PLUGIN)
    timings["napari open (s)"] = time.perf_counter() - start
    _wait(lambda: session.layer("tissue") is not None, 120, "the tissue preview")
    scale, units = slide_scale(session.slide)
    viewer.add_shapes(
        boxes_to_rectangles([lesion["box"] for lesion in truth["lesions"]], scale),
        shape_type="rectangle",
        edge_color="yellow",
        face_color="transparent",
        edge_width=8 * scale[0],
        name="lesions (truth)",
        units=units,
        features={"class": [lesion["class"] for lesion in truth["lesions"]]},
    )

    model_panel = panels["Model"]
    model_panel.set_checkpoint(dual_checkpoint)  # offered in the list, run on the HER2 slide
    model_panel.set_checkpoint(checkpoint)  # the grid model, run below
    start = time.perf_counter()
    model_panel.run()
    _wait(lambda: model_panel.worker is None, 600, "the grid model's run")
    result = session.result
    if result is None or not hasattr(result, "confidence"):
        raise RuntimeError(f"demo: the Model panel's run failed: {model_panel.status.text()}")
    result.save(out / "result")
    timings["predict from the Model panel (s)"] = time.perf_counter() - start
    attention_kwargs = {"name": session.layer("attention").name}
    attention_kwargs["metadata"] = session.layer("attention").metadata
    viewer.dims.set_current_step(0, 0)  # the map with the most weight in the call

    review = panels["Review"]
    review.author.setText("demo")
    review.accept_label()
    if truth["lesions"] and not session.labels.regions(path):
        # an annotator's region around the first lesion (stored once; the store keeps it)
        first = truth["lesions"][0]
        session.layer("regions").add_rectangles(boxes_to_rectangles([first["box"]], scale))
        session.layer("regions").selected_data = {0}
        review.label_selected(first["class"])
    tour = panels["Tour"]
    tour.next()
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    (overlays.scale_bar if overlays is not None else viewer.scale_bar).visible = True
    viewer.reset_view()

    shots: list[Path] = []
    start = time.perf_counter()
    if headless:
        for name, panel in panels.items():
            shot = out / f"panel-{name.lower().replace('-', '')}.png"
            panel.grab().save(str(shot))
            shots.append(shot)
        window = out / "window.png"
        viewer.screenshot(str(window), canvas_only=False)
        shots.append(window)
        overview = out / "overview.png"
        _fit_slide(session, SHOT)
        viewer.screenshot(str(overview), canvas_only=True, size=SHOT)
        shots.append(overview)
        if truth["lesions"]:
            x, y, w, h = truth["lesions"][0]["box"]
            session.camera.center = ((y + h / 2) * scale[0], (x + w / 2) * scale[1])
            session.camera.zoom = 1.0 / (4 * w * scale[1] / 1024)  # lesion ~1/4 of the view
            zoomed = out / "lesion.png"
            viewer.screenshot(str(zoomed), canvas_only=True, size=SHOT)
            shots.append(zoomed)
    timings["screenshots (s)"] = time.perf_counter() - start
    layers = [(layer.name, type(layer).__name__) for layer in viewer.layers]
    stored = session.labels.slide_label(path)

    # The dual model on the task of its paper: the HER2 sample, from the Model panel.
    viewer.layers.remove("lesions (truth)")
    viewer.open(str(ihc_path), plugin=PLUGIN)
    _wait(
        lambda: (
            session.slide is not None
            and Path(session.slide.path) == ihc_path
            and session.layer("tissue") is not None
        ),
        120,
        "the HER2 slide's tissue preview",
    )
    ihc_scale, _ = slide_scale(session.slide)
    tumour = tumour_mask_truth(ihc_truth, TRUTH_DOWNSAMPLE)
    viewer.add_labels(
        tumour.astype(np.uint8),
        name="tumour (truth)",
        scale=(ihc_scale[0] * TRUTH_DOWNSAMPLE, ihc_scale[1] * TRUTH_DOWNSAMPLE),
        translate=(
            (TRUTH_DOWNSAMPLE - 1) / 2 * ihc_scale[0],
            (TRUTH_DOWNSAMPLE - 1) / 2 * ihc_scale[1],
        ),
        units=units,
        opacity=0.9,
        blending="translucent_no_depth",
    )
    viewer.layers["tumour (truth)"].contour = 2
    viewer.layers["tumour (truth)"].colormap = DirectLabelColormap(
        color_dict={None: "transparent", 0: "transparent", 1: "lime"}
    )
    start = time.perf_counter()
    model_panel.set_checkpoint(dual_checkpoint)
    model_panel.run()
    _wait(lambda: model_panel.worker is None, 600, "the dual model's run")
    dual = session.result
    if dual is None or dual.model_kind != "dual-attention":
        raise RuntimeError(f"demo: the dual model's run failed: {model_panel.status.text()}")
    dual.save(out / "result-dual")
    timings["predict dual on the HER2 sample from the Model panel (s)"] = (
        time.perf_counter() - start
    )
    tile_boxes = np.asarray(dual.arrays["tile_boxes"])
    on_tumour = on_mask(box_centres(tile_boxes), tumour, TRUTH_DOWNSAMPLE)
    tissue_cells = np.asarray(dual.arrays["soft_tissue"], dtype=bool)
    cell = float(dual.info["soft_attention"]["cell_size"])
    ys, xs = np.nonzero(tissue_cells)
    uniform = (
        float(
            on_mask(
                np.stack([(xs + 0.5) * cell, (ys + 0.5) * cell], 1), tumour, TRUTH_DOWNSAMPLE
            ).mean()
        )
        if len(xs)
        else 0.0
    )
    viewer.reset_view()
    tour.next()  # the Tour panel now holds the sampled tiles: the first, whole
    if headless:
        start = time.perf_counter()
        soft = session.layer("soft attention")
        if soft is not None:
            soft.visible = True
        _fit_slide(session, SHOT)
        sampled = out / "dual-overview.png"
        viewer.screenshot(str(sampled), canvas_only=True, size=SHOT)
        shots.append(sampled)
        if soft is not None:
            soft.visible = False
        if len(tile_boxes):
            tour.go(0)
            glimpses = out / "dual-glimpses.png"
            viewer.screenshot(str(glimpses), canvas_only=True, size=SHOT)
            shots.append(glimpses)
        for name in ("Model", "Tour"):
            shot = out / f"panel-{name.lower()}-dual.png"
            panels[name].grab().save(str(shot))
            shots.append(shot)
        timings["screenshots (s)"] += time.perf_counter() - start
    dual_layers = [(layer.name, type(layer).__name__) for layer in viewer.layers]
    if not headless:
        napari.run()
        return 0
    session.labels.close()  # checkpoints the WAL into the store file
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
        f"- HER2 sample: `{ihc_path}`, truth score **{ihc_truth['label']}**, tumour "
        f"{ihc_truth['tumour_fraction']:.0%} of the tissue",
        f"- demo dual model (dual attention, {DEMO_DUAL['epochs']} epochs joint on "
        f"{4 * DEMO_IHC_COHORT['slides_per_class']['train']} synthetic HER2 slides, slide "
        f"labels only, the paper's HER2 sampling): `{dual_checkpoint}`",
        f"- dual prediction on the HER2 sample: **{dual.predicted_class}** "
        f"({dual.confidence:.0%}), the most frequent class of {len(tile_boxes)} sampled tiles "
        f"({', '.join(dual.classes[c] for c in dual.arrays['tile_classes'])}); "
        f"**{int(on_tumour.sum())} of {len(tile_boxes)} sampled tiles lie on the tumour** "
        f"(centre inside the true tumour), where tiles drawn uniformly in the tissue would "
        f"be {uniform:.0%}; {dual.arrays['glimpse_centres'].shape[1]} glimpses per tile",
        f"- panels: {', '.join(PANELS)}; the Review panel stored the slide label "
        f"**{stored.label}** ({stored.status} by {stored.author}) in `{session.labels.path}`",
        f"- layers (H&E): {', '.join(f'{n} ({t})' for n, t in layers)}",
        f"- layers (HER2): {', '.join(f'{n} ({t})' for n, t in dual_layers)}",
        f"- screenshots: {', '.join(f'`{s.name}`' for s in shots)}",
        f"- machine: {platform.platform()}, Python {platform.python_version()}, "
        f"napari {napari.__version__}",
        "",
        "| step | seconds |",
        "| --- | --- |",
        *[f"| {k} | {v:.2f} |" for k, v in timings.items()],
        "",
    ]
    atomic_write_text(report, "\n".join(lines))
    atomic_write_text(
        out / "report.json",
        json.dumps(
            {
                "slide": facts,
                "truth": truth,
                "layers": layers,
                "her2_layers": dual_layers,
                "timings": timings,
                "prediction": {
                    "class": result.predicted_class,
                    "probabilities": dict(
                        zip(result.classes, map(float, result.probabilities), strict=True)
                    ),
                    "checkpoint": str(checkpoint),
                },
                "dual_prediction": {
                    "class": dual.predicted_class,
                    "probabilities": dict(
                        zip(dual.classes, map(float, dual.probabilities), strict=True)
                    ),
                    "slide": str(ihc_path),
                    "truth": ihc_truth["label"],
                    "tile_boxes": tile_boxes.tolist(),
                    "tiles_on_tumour": int(on_tumour.sum()),
                    "uniform_share_on_tumour": uniform,
                    "checkpoint": str(dual_checkpoint),
                },
            },
            indent=2,
        ),
    )
    print(f"demo: wrote {report} and {len(shots)} screenshot(s) in {out}")
    return 0
