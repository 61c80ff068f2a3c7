"""The ``slide-attention`` command line: everything the GUI does, headless.

Errors end the command with a non-zero status and one readable line on stderr
(``slide-attention: error: PATH: problem``); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_STOPPED = 130  # what shells report for a command ended by Ctrl-C (128 + SIGINT)


def _open(path: str, mpp: float | None):
    from ..slide.reader import MissingMppWarning, open_slide

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MissingMppWarning)
        slide = open_slide(path, mpp=mpp)
    for warning in caught:
        if issubclass(warning.category, MissingMppWarning):
            print(f"slide-attention: warning: {warning.message}", file=sys.stderr)
    return slide


def _tissue_params(args: argparse.Namespace):
    from ..slide.tissue import TissueParams

    overrides = {
        name: getattr(args, name)
        for name in (
            "method",
            "mask_mpp",
            "mask_downsample",
            "closing_radius_um",
            "opening_radius_um",
            "min_piece_area_um2",
            "max_hole_area_um2",
        )
        if getattr(args, name, None) is not None
    }
    return TissueParams(**overrides)


def _add_tissue_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tissue detection")
    group.add_argument("--method", choices=("auto", "saturation", "od"), help="thresholding")
    group.add_argument("--mask-mpp", type=float, help="resolution of the mask, µm/px")
    group.add_argument("--mask-downsample", type=float, help="used when the mpp is unknown")
    group.add_argument("--closing-radius-um", type=float)
    group.add_argument("--opening-radius-um", type=float)
    group.add_argument("--min-piece-area-um2", type=float, help="smaller pieces are dropped")
    group.add_argument("--max-hole-area-um2", type=float, help="smaller holes are filled")


def cmd_info(args: argparse.Namespace) -> int:
    from ..slide.tissue import tissue_mask

    slide = _open(args.slide, args.mpp)
    facts = slide.describe()
    if not args.no_tissue and slide.rgb:
        mask = tissue_mask(slide, _tissue_params(args))
        facts["tissue_fraction"] = round(float(mask.fraction), 4)
    else:
        facts["tissue_fraction"] = None
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    width, height = facts["dimensions"]
    mpp = facts["mpp"]
    lines = [
        f"{facts['path']}",
        f"  vendor         {facts['vendor']}",
        f"  dimensions     {width} x {height} px ({facts['channels']} x {facts['dtype']}"
        f"{', RGB' if facts['rgb'] else ''})",
        "  mpp            "
        + (f"{mpp[0]:.4f} x {mpp[1]:.4f} µm/px ({facts['mpp_source']})" if mpp else "unknown"),
        "  magnification  "
        + (f"{facts['magnification']:g}x" if facts["magnification"] else "unknown"),
        "  tile size      "
        + ("x".join(str(v) for v in facts["tile_shape"][::-1]) if facts["tile_shape"] else "-"),
        "  tissue         "
        + (f"{facts['tissue_fraction']:.1%}" if facts["tissue_fraction"] is not None else "-"),
        f"  associated     {', '.join(facts['associated']) or '-'}",
        "  levels",
    ]
    for level in facts["levels"]:
        h, w = level["shape"]
        tile = "x".join(str(v) for v in level["tile_shape"][::-1]) if level["tile_shape"] else "-"
        level_mpp = f"{level['mpp'][0]:.3f} µm/px" if level["mpp"] else ""
        virtual = " (computed)" if level["virtual"] else ""
        lines.append(
            f"    {level['index']}: {w} x {h}  downsample {level['downsample']:g}  "
            f"tiles {tile}  {level_mpp}{virtual}"
        )
    for note in facts["notes"]:
        lines.append(f"  note: {note}")
    print("\n".join(lines))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from ..slide.synthetic import write_synthetic_slide

    width, height = args.size
    info = write_synthetic_slide(
        args.out,
        size=(width, height),
        label=args.label,
        seed=args.seed,
        tile_size=args.tile_size,
        mpp=args.slide_mpp,
        magnification=args.magnification,
    )
    print(
        f"wrote {info.path} ({width} x {height} px, label {info.label}, "
        f"{len(info.lesion_boxes)} lesion(s)); truth in {info.sidecar}"
    )
    return 0


def cmd_tissue(args: argparse.Namespace) -> int:
    import imagecodecs
    import numpy as np

    from ..slide.tissue import tile_grid, tissue_mask, tissue_pieces

    slide = _open(args.slide, args.mpp)
    mask = tissue_mask(slide, _tissue_params(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(imagecodecs.png_encode(mask.mask.astype(np.uint8) * 255))
    pieces = tissue_pieces(mask, mpp=slide.mpp)
    summary: dict[str, Any] = {
        "slide": str(slide.path),
        "mask": str(out),
        "mask_shape": list(mask.mask.shape),
        "mask_downsample": mask.downsample,
        "tissue_fraction": round(float(mask.fraction), 4),
        "pieces": [{"label": p.label, "box": [int(v) for v in p.box]} for p in pieces],
    }
    if args.tile_size:
        grid = tile_grid(mask, args.tile_size, min_tissue=args.min_tissue)
        summary["tiles"] = len(grid)
        summary["tile_size"] = args.tile_size
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"wrote {out} ({mask.mask.shape[1]} x {mask.mask.shape[0]} px, 1 px = "
            f"{mask.downsample:g} level-0 px); tissue {mask.fraction:.1%} in {len(pieces)} piece(s)"
            + (f"; {summary['tiles']} tiles of {args.tile_size} px" if args.tile_size else "")
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .._napari.demo import run_demo

    return run_demo(out=Path(args.out), headless=args.headless, size=args.size)


# -- models ------------------------------------------------------------------------------
class _ProgressPrinter:
    """Prints progress events: one line per epoch/piece, a live line for steps on a tty."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.live = False

    def __call__(self, event) -> None:
        if self.quiet:
            return
        if event.stage == "step":
            if self.tty:
                print(f"\r{event.message:<78}", end="", file=sys.stderr, flush=True)
                self.live = True
            return
        if self.live:
            print(file=sys.stderr)
            self.live = False
        total = f" [{event.done}/{event.total}]" if event.total else ""
        print(f"{event.stage}{total} {event.message}", file=sys.stderr, flush=True)


_DROP = object()


def _json_safe(value: Any) -> Any:
    """``value`` reduced to what JSON carries, or ``_DROP`` when none of it can go.

    Numbers, strings, bools and None stay (numpy scalars become Python numbers, NaN and
    infinities None, paths strings); lists, tuples and dicts keep their JSON-safe items;
    anything else (tensors, arrays, result objects) is dropped: an event line must stay
    small and parseable by any JSON reader.
    """
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            item = _json_safe(item)
            if isinstance(key, str | int | float) and item is not _DROP:
                out[str(key)] = item
        return out
    if isinstance(value, list | tuple):
        return [item for item in map(_json_safe, value) if item is not _DROP]
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return _json_safe(value.item())  # np.float32 losses, np.int64 counts, np.bool_
    return _DROP


class _EventPrinter:
    """Prints progress events as JSON lines on stdout, one flushed line per event, for a
    program (the GUI) that runs the command and follows its output:
    ``{"stage", "done", "total", "message", "data"}``."""

    def __call__(self, event) -> None:
        self.emit(event.stage, event.done, event.total, event.message, event.data)

    @staticmethod
    def emit(
        stage: str,
        done: int = 0,
        total: int = 0,
        message: str = "",
        data: dict[str, Any] | None = None,
    ) -> None:
        line = {
            "stage": stage,
            "done": _json_safe(done),
            "total": _json_safe(total),
            "message": str(message),
            "data": _json_safe(dict(data or {})),
        }
        sys.stdout.write(json.dumps(line, allow_nan=False) + "\n")
        sys.stdout.flush()


class _StopSignals:
    """SIGINT and SIGTERM while a run lasts: remembered, not raised, so the run stops at
    its next progress event instead of in the middle of writing a checkpoint.

    The previous handlers come back when the block ends. Outside the main thread (the
    command run from a GUI thread) signals cannot be caught there; nothing is installed.

    Attributes:
        received: the name of the first signal received, or None.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            # None: a handler set outside Python; the default is the nearest we can restore
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()


def _parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            values[key.strip().replace("-", "_")] = json.loads(text)
        except json.JSONDecodeError:
            values[key.strip().replace("-", "_")] = text
    return values


_TRAIN_OPTIONS = (
    "epochs",
    "lr",
    "samples_per_step",
    "n_maps",
    "tile_um",
    "input_px",
    "chunk_tiles",
    "trainable_blocks",
    "weights",
    "device",
    "seed",
    "batch_size",
    "mode",
    "sampler",
    "n_tiles",
)


def _settings(cls, args: argparse.Namespace):
    from dataclasses import fields

    known = {f.name for f in fields(cls)}
    values = {k: getattr(args, k) for k in _TRAIN_OPTIONS if getattr(args, k, None) is not None}
    if "crop_um" in known and "tile_um" in values:  # the crop classifier's tile edge
        values["crop_um"] = values.pop("tile_um")
    values = {k: v for k, v in values.items() if k in known}
    if getattr(args, "amp", None):
        values["amp"] = True
    values.update(_parse_sets(args.set))
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown setting(s) for this model: {', '.join(unknown)}; known: "
            f"{', '.join(sorted(known))}"
        )
    return cls(**values)


def _cohort(args: argparse.Namespace):
    from ..train.cohort import read_cohort

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    return read_cohort(args.cohort, classes)


def cmd_synth_cohort(args: argparse.Namespace) -> int:
    from ..train.cohort import make_synthetic_cohort

    per = {}
    for item in args.per_class:
        split, _, n = item.partition("=")
        per[split] = int(n)
    cohort = make_synthetic_cohort(
        args.out,
        slides_per_class=per,
        size=tuple(args.size),
        seed=args.seed,
        lesion_size=args.lesion_size,
        n_pieces=args.n_pieces,
    )
    print(f"{cohort.path}: {len(cohort)} slides")
    for split, counts in cohort.counts().items():
        print(f"  {split:<5} " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _labelled_cohort(args: argparse.Namespace, cohort, events: _EventPrinter | None, file=None):
    """The cohort with the labels of ``--labels`` applied; says what was applied (as an
    event, or a line on ``file``, stdout by default)."""
    from dataclasses import asdict

    from ..labels import LabelStore, LabelStoreError, apply_labels_with_summary

    path = Path(args.labels)
    if not path.is_file():
        # opening would create an empty store: a typo must not train on the cohort's labels
        raise LabelStoreError(path, "no such label store")
    with LabelStore(path) as store:
        cohort, applied = apply_labels_with_summary(cohort, store)
    message = f"labels from {path}: {applied.summary()}"
    if events is not None:
        events.emit("labels", message=message, data={"store": str(path), **asdict(applied)})
    else:
        print(message, file=file or sys.stdout, flush=True)
    return cohort


def _run_training(
    work, on_event: Callable[[Any], None], stop: _StopSignals
) -> tuple[Any, bool, int]:
    """Drive a training generator until it ends or a stop signal arrives.

    Returns:
        The run's summary (None when stopped), whether a checkpoint of this run exists
        (written by it or resumed from), and the epochs completed so far.
    """
    own_checkpoint = False
    epochs_done = 0
    while True:
        try:
            event = next(work)
        except StopIteration as end:
            return end.value, own_checkpoint, epochs_done
        # "resume": the run goes on from the last.safetensors an earlier run left
        if event.stage in ("epoch", "resume"):
            own_checkpoint, epochs_done = True, event.done
        on_event(event)
        if stop.received is not None:
            # at a yield no file is half-written: every checkpoint is complete on disk
            work.close()
            return None, own_checkpoint, epochs_done


def _absolute(path: str | os.PathLike | None) -> str | None:
    """An event's path, absolute: the program reading the events may run elsewhere."""
    return None if path is None else str(Path(path).absolute())


def cmd_train(args: argparse.Namespace) -> int:
    events = _EventPrinter() if args.events else None
    cohort = _cohort(args)
    if args.labels:
        cohort = _labelled_cohort(args, cohort, events)
    tissue = _tissue_params(args)
    printer = events if events is not None else _ProgressPrinter(args.quiet)
    with _StopSignals() as stop:
        if args.model == "grid":
            from ..train.grid import GridTrainSettings, train_grid

            settings = _settings(GridTrainSettings, args)
            work = train_grid(
                cohort,
                args.out,
                settings,
                resume=not args.no_resume,
                tissue=tissue,
                init=args.init,
            )
        elif args.model == "dual":
            from ..train.dual import DualTrainSettings, train_dual

            settings = _settings(DualTrainSettings, args)
            work = train_dual(
                cohort,
                args.out,
                settings,
                resume=not args.no_resume,
                tissue=tissue,
                init=args.init,
            )
        else:
            from ..train.sliding_window import SlidingWindowSettings, train_sliding_window

            settings = _settings(SlidingWindowSettings, args)
            work = train_sliding_window(
                cohort, args.out, settings, resume=not args.no_resume, tissue=tissue
            )
        summary, own_checkpoint, epochs_done = _run_training(work, printer, stop)
    run_dir = Path(args.out)
    if summary is None:
        last = run_dir / "last.safetensors"
        last = last if own_checkpoint and last.exists() else None
        if events is not None:
            events.emit(
                "stopped",
                epochs_done,
                0,
                f"stopped by {stop.received}",
                {"last": _absolute(last), "epochs_done": epochs_done, "signal": stop.received},
            )
        else:
            if printer.live:  # end the live step line first
                print(file=sys.stderr)
            print(
                f"stopped by {stop.received} after {epochs_done} epoch(s)\n"
                + (
                    f"last: {last} (run the same command again to resume)"
                    if last
                    else "last: none (no epoch of this run finished)"
                )
            )
        return EXIT_STOPPED
    if events is not None:
        events.emit(
            "done",
            summary.epochs_done,
            summary.epochs_done,
            "training finished",
            {
                "best": _absolute(summary.best),
                "last": _absolute(summary.last),
                "epochs_done": summary.epochs_done,
                "stopped": summary.stopped_early,
                "run_dir": _absolute(run_dir),
                "log": _absolute(run_dir / "log.csv"),
            },
        )
        return 0
    print(f"best: {summary.best}\nlast: {summary.last}\nlog: {run_dir / 'log.csv'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..inference import predict
    from ..progress import run_to_end

    slide = _open(args.slide, args.mpp)
    with slide:
        options: dict[str, Any] = {"device": args.device, "tissue": _tissue_params(args)}
        if args.aggregation:
            options["aggregation"] = args.aggregation
        if args.amp:
            options["amp"] = True
        result = run_to_end(predict(args.model, slide, **options), _ProgressPrinter(args.quiet))
    path = result.save(args.out)
    if args.json:
        print(json.dumps(result.to_json_dict(), indent=2))
    else:
        print(result.summary())
        print(f"saved: {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from ..inference import load_any, predict
    from ..progress import run_to_end
    from ..train.metrics import evaluate, format_confusion, format_table2

    cohort = _cohort(args)
    if args.labels:  # with --json, stdout is the JSON alone
        cohort = _labelled_cohort(args, cohort, None, sys.stderr if args.json else None)
    entries = cohort.split(args.split)
    if not entries:
        raise ValueError(f"{cohort.path}: the {args.split!r} split has no slides")
    tissue = _tissue_params(args)
    printer = _ProgressPrinter(True)
    results: dict[str, Any] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    for model_path in args.model:
        model, checkpoint = load_any(model_path, args.device)
        classes = tuple(checkpoint.config["classes"])
        if classes != cohort.classes:
            raise ValueError(
                f"{model_path}: the model's classes {list(classes)} differ from the cohort's "
                f"{list(cohort.classes)} (pass --classes in the model's order)"
            )
        name = f"{checkpoint.kind} ({Path(model_path).parent.name or Path(model_path).stem})"
        while name in results:
            name += "'"
        probs, truth, preds, slide_rows = [], [], [], []
        for n, entry in enumerate(entries, 1):
            result = run_to_end(
                predict(model, entry.slide, device=args.device, tissue=tissue), printer
            )
            probs.append(result.probabilities.astype(np.float64))
            preds.append(result.predicted)
            truth.append(entry.label)
            slide_rows.append(
                {
                    "slide": str(entry.slide),
                    "truth": cohort.classes[entry.label],
                    "predicted": result.predicted_class,
                    "confidence": float(result.confidence),
                }
            )
            if not args.quiet:
                print(
                    f"{name}: [{n}/{len(entries)}] {entry.slide.name}: "
                    f"{result.predicted_class} (truth {cohort.classes[entry.label]})",
                    file=sys.stderr,
                )
        p = np.stack(probs)
        results[name] = evaluate(truth, preds, p / p.sum(1, keepdims=True), classes=classes)
        rows[name] = slide_rows
    if args.json:
        print(
            json.dumps(
                {
                    "split": args.split,
                    "cohort": str(cohort.path),
                    "models": {
                        k: {"metrics": m.to_dict(), "slides": rows[k]} for k, m in results.items()
                    },
                },
                indent=2,
            )
        )
    else:
        print(f"{args.split} split of {cohort.path}: {len(entries)} slides\n")
        print(format_table2(results))
        for name, metrics in results.items():
            print(f"\n{name}: confusion (rows truth, columns prediction)")
            print(format_confusion(metrics))
    return 0


# -- labels ------------------------------------------------------------------------------
def _existing_store(path: str):
    """The label store at ``path``; a missing file is an error, not a new store."""
    from ..labels import LabelStore, LabelStoreError

    if not Path(path).is_file():
        raise LabelStoreError(path, "no such label store")
    return LabelStore(path)


def cmd_labels_export(args: argparse.Namespace) -> int:
    if args.slide and not args.geojson:
        raise ValueError("--slide works with --geojson only (the CSV has every slide)")
    with _existing_store(args.store) as store:
        if args.geojson:
            n = store.export_geojson(args.geojson, slide=args.slide)
            print(f"wrote {n} region(s) to {args.geojson}")
        else:
            n = store.export_csv(args.csv)
            print(f"wrote {n} row(s) (slide labels and regions) to {args.csv}")
    return 0


def cmd_labels_import(args: argparse.Namespace) -> int:
    from ..labels import LabelStore

    store_path = Path(args.store)
    created = not store_path.exists()
    try:
        with (
            LabelStore(store_path, author=args.author) as store,
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            n = store.import_geojson(args.geojson, args.slide)
    except BaseException:
        if created:  # a failed import leaves no empty store behind
            for suffix in ("", "-wal", "-shm"):
                Path(f"{store_path}{suffix}").unlink(missing_ok=True)
        raise
    for warning in caught:
        print(f"slide-attention: warning: {warning.message}", file=sys.stderr)
    if not Path(args.slide).exists():
        print(
            f"slide-attention: warning: {args.slide} does not exist; the regions are kept "
            "under its path",
            file=sys.stderr,
        )
    print(f"{args.geojson}: {n} region(s) on {args.slide} in {store_path}")
    return 0


def _shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows as aligned columns under a header."""
    cells = [[str(v) for v in header], *[[str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _state_text(target: str, state: dict[str, Any] | None) -> str:
    """One change's old or new state in a few words."""
    if state is None:
        return "-"
    if target == "slide_label":
        return f"{state['label']} ({state['status']})"
    if target == "note":
        return repr(_shorten(state["text"], 30))
    return f"{state['label']} {state['kind']} ({len(state['geometry'])} vertices)"


def cmd_labels_show(args: argparse.Namespace) -> int:
    from ..labels import slide_key

    with _existing_store(args.store) as store:
        base = store.path.resolve().parent

        def shown(key: str) -> str:
            # slides next to the store (the cohort's folder) read shorter relative to it
            path = Path(key)
            return path.relative_to(base).as_posix() if path.is_relative_to(base) else key

        lines = [f"{store.path}"]
        if args.slide:
            key = slide_key(args.slide)
            label = store.slide_label(key)
            lines.append(f"slide  {key}")
            lines.append(
                "label  "
                + (
                    f"{label.label} ({label.status} by {label.author}, {label.time[:19]})"
                    + (f": {label.note}" if label.note else "")
                    if label
                    else "-"
                )
            )
            lines.append(f"note   {store.note(key) or '-'}")
            regions = store.regions(key)
            lines.append(f"regions  {len(regions)}")
            if regions:
                rows = [
                    (
                        r.id,
                        r.kind,
                        r.label,
                        "{} {} {} {}".format(*r.box),
                        r.author,
                        r.time[:19],
                        _shorten(r.note, 30),
                    )
                    for r in regions
                ]
                header = ("id", "kind", "label", "box x y w h", "author", "time", "note")
                lines.append(_table(header, rows))
        else:
            labels = store.slide_labels()
            slides = store.slides()
            lines[0] += f": {len(slides)} slide(s) with labels, notes or regions"
            rows = []
            for key in slides:
                label = labels.get(key)
                rows.append(
                    (
                        shown(key),
                        label.label if label else "-",
                        label.status if label else "-",
                        len(store.regions(key)),
                        label.author if label else "-",
                        label.time[:19] if label else "-",
                        _shorten(store.note(key), 30),
                    )
                )
            if rows:
                header = ("slide", "label", "status", "regions", "author", "time", "note")
                lines.append(_table(header, rows))
        if args.history:
            changes = store.history(args.slide)
            lines.append(f"\nhistory: {len(changes)} change(s)")
            rows = [
                (
                    c.id,
                    c.time[:19],
                    c.author,
                    shown(c.slide),
                    c.target,
                    c.action + (f" #{c.undoes}" if c.undoes else ""),
                    _state_text(c.target, c.old),
                    _state_text(c.target, c.new),
                    f"undone by #{c.undone_by}" if c.undone_by else "",
                )
                for c in changes
            ]
            if rows:
                header = ("id", "time", "author", "slide", "target", "action", "old", "new", "")
                lines.append(_table(header, rows))
    print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slide-attention",
        description="Attention-based classification of whole-slide images (headless tools).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="levels, mpp, magnification, vendor, tiles, tissue")
    info.add_argument("slide")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--mpp", type=float, help="override the slide's µm per pixel")
    info.add_argument("--no-tissue", action="store_true", help="skip the tissue fraction")
    _add_tissue_options(info)
    info.set_defaults(func=cmd_info)

    synth = sub.add_parser("synth", help="write a synthetic needle-in-a-haystack slide")
    synth.add_argument("out", help="output .tif path (the truth goes to OUT.json)")
    synth.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=(8192, 8192))
    synth.add_argument("--label", default="carcinoma", help="class name or index")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--tile-size", type=int, default=256)
    synth.add_argument("--slide-mpp", type=float, default=0.5, help="µm per pixel written")
    synth.add_argument("--magnification", type=float, default=20.0)
    synth.set_defaults(func=cmd_synth)

    tissue = sub.add_parser("tissue", help="tissue mask as a PNG, pieces and tile count")
    tissue.add_argument("slide")
    tissue.add_argument("--out", required=True, help="mask PNG to write")
    tissue.add_argument("--mpp", type=float, help="override the slide's µm per pixel")
    tissue.add_argument("--tile-size", type=int, help="also count grid tiles of this size")
    tissue.add_argument("--min-tissue", type=float, default=0.5, help="tile tissue fraction")
    tissue.add_argument("--json", action="store_true")
    _add_tissue_options(tissue)
    tissue.set_defaults(func=cmd_tissue)

    cohort = sub.add_parser("synth-cohort", help="write a cohort of synthetic slides + CSV")
    cohort.add_argument("out", help="output folder (cohort.csv and the slides)")
    cohort.add_argument(
        "--per-class",
        nargs="+",
        default=["train=4", "val=2", "test=2"],
        metavar="SPLIT=N",
        help="slides per class and split",
    )
    cohort.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=(3072, 2048))
    cohort.add_argument("--seed", type=int, default=0)
    cohort.add_argument("--lesion-size", type=int, default=100, help="lesion side, level-0 px")
    cohort.add_argument("--n-pieces", type=int, help="tissue pieces per slide (default 1-3)")
    cohort.set_defaults(func=cmd_synth_cohort)

    train = sub.add_parser("train", help="train a model on a cohort (grid, dual, sliding-window)")
    train.add_argument("model", choices=("grid", "dual", "sliding-window"))
    train.add_argument("--cohort", required=True, help="cohort CSV (slide,label,split,...)")
    train.add_argument("--out", required=True, help="run folder: checkpoints, logs")
    train.add_argument("--classes", help="class names, lowest to highest risk, comma-separated")
    train.add_argument("--epochs", type=int)
    train.add_argument("--lr", type=float, help="initial learning rate")
    train.add_argument("--mode", choices=("joint", "soft", "hard"), help="dual: what trains")
    train.add_argument(
        "--sampler", choices=("attention", "random"), help="dual: tile sampling (random = baseline)"
    )
    train.add_argument("--n-tiles", type=int, help="dual: tiles sampled per slide (10)")
    train.add_argument("--samples-per-step", type=int, help="grid: pieces per optimiser step")
    train.add_argument("--batch-size", type=int, help="sliding window: crops per step")
    train.add_argument("--n-maps", type=int, help="grid: attention maps (64)")
    train.add_argument("--tile-um", type=float, help="tile (crop) edge in µm (246)")
    train.add_argument("--input-px", type=int, help="tile edge fed to the network (224)")
    train.add_argument("--chunk-tiles", type=int, help="tiles per forward chunk")
    train.add_argument("--trainable-blocks", type=int, help="trunk stages that train")
    train.add_argument("--weights", help="pretrained trunk weights (local file)")
    train.add_argument("--init", help="grid, dual: start from this checkpoint (fine-tune)")
    train.add_argument("--device", help="auto, cpu or cuda")
    train.add_argument("--amp", action="store_true", help="mixed precision")
    train.add_argument("--seed", type=int)
    train.add_argument("--no-resume", action="store_true", help="start over in --out")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other training setting (JSON value), e.g. --set lr_decay=0.9",
    )
    train.add_argument("--quiet", action="store_true")
    train.add_argument(
        "--labels",
        metavar="DB",
        help="label store (slide-attention labels): its slide labels and regions replace "
        "the cohort's",
    )
    train.add_argument(
        "--events",
        action="store_true",
        help="print progress as JSON lines on stdout (for programs) instead of text",
    )
    _add_tissue_options(train)
    train.set_defaults(func=cmd_train)

    predict = sub.add_parser("predict", help="run a trained model on a slide; save the result")
    predict.add_argument("--model", required=True, help="checkpoint (.safetensors)")
    predict.add_argument("--slide", required=True)
    predict.add_argument("--out", required=True, help="result folder (result.json + zarr)")
    predict.add_argument("--device", default="auto", help="auto, cpu or cuda")
    predict.add_argument(
        "--aggregation",
        choices=("highest-risk", "mean", "max", "thresholds", "top-k-mean"),
        help="grid: how pieces make the call; sliding window: thresholds or top-k-mean",
    )
    predict.add_argument("--amp", action="store_true", help="mixed precision")
    predict.add_argument("--mpp", type=float, help="override the slide's µm per pixel")
    predict.add_argument("--json", action="store_true")
    predict.add_argument("--quiet", action="store_true")
    _add_tissue_options(predict)
    predict.set_defaults(func=cmd_predict)

    evaluate = sub.add_parser("evaluate", help="Table-2 metrics of models on a cohort split")
    evaluate.add_argument("--model", required=True, action="append", help="checkpoint (repeat)")
    evaluate.add_argument("--cohort", required=True)
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--classes", help="class names, lowest to highest risk")
    evaluate.add_argument(
        "--labels", help="label store: its corrected slide labels are the truth (SQLite)"
    )
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--quiet", action="store_true")
    _add_tissue_options(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    labels = sub.add_parser("labels", help="a cohort's label store: export, import, show")
    labels_sub = labels.add_subparsers(dest="labels_command", required=True, metavar="ACTION")
    export = labels_sub.add_parser("export", help="regions as QuPath GeoJSON, or labels as CSV")
    export.add_argument("--store", required=True, help="label store (.labels.sqlite)")
    what = export.add_mutually_exclusive_group(required=True)
    what.add_argument("--geojson", metavar="OUT", help="write the regions as GeoJSON")
    what.add_argument("--csv", metavar="OUT", help="write slide labels and regions as CSV")
    export.add_argument("--slide", help="GeoJSON: only this slide's regions")
    export.set_defaults(func=cmd_labels_export)
    imported = labels_sub.add_parser("import", help="regions from a GeoJSON file (QuPath's)")
    imported.add_argument("--store", required=True, help="label store (created if missing)")
    imported.add_argument("--geojson", required=True, metavar="IN")
    imported.add_argument("--slide", required=True, help="the slide the regions belong to")
    imported.add_argument("--author", help="who the regions are by (default: login name)")
    imported.set_defaults(func=cmd_labels_import)
    show = labels_sub.add_parser("show", help="slide labels and regions as a table")
    show.add_argument("--store", required=True)
    show.add_argument("--slide", help="one slide: its label, note and regions")
    show.add_argument("--history", action="store_true", help="also every change")
    show.set_defaults(func=cmd_labels_show)

    demo = sub.add_parser("demo", help="sample slide in napari (headless: screenshot + report)")
    demo.add_argument("--out", default="out/demo", help="where headless output goes")
    demo.add_argument("--headless", action="store_true", help="no window; write files")
    demo.add_argument("--size", type=int, default=8192, help="sample slide side, px")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..slide.reader import SlideError

    try:
        return int(args.func(args) or 0)
    except (SlideError, ValueError, OSError) as exc:
        if args.debug:
            raise
        if getattr(args, "events", False):  # a program following the lines learns it too
            _EventPrinter.emit("error", message=str(exc))
        print(f"slide-attention: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("slide-attention: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
