"""What the plugin's panels share in one viewer: the slide on show, its cohort and label
store, the model's latest result and the checkpoints on offer.

One ``Session`` per viewer (``session_for``). Panels talk through its signals instead of
to each other, so each panel works alone (a test may open just one) and all of them
work together. The session owns the layers it makes, by role ("slide", "attention",
"sampled tiles", ...): showing a new result replaces its layers in place, so a
user's opacity or colormap choice survives the next run.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import Signal

from ..slide.reader import Slide, open_slide
from ..slide.tissue import TissueParams
from .layers import (
    attention_layer_data,
    glimpse_layer_data,
    sampled_tiles_layer_data,
    slide_layer_data,
    slide_scale,
    soft_attention_layer_data,
)

if TYPE_CHECKING:
    import napari

    from ..labels import LabelStore
    from ..results import PieceResult, SlideResult
    from ..train.cohort import Cohort

__all__ = ["PartialResult", "Session", "connect_while_alive", "session_for"]

# The roles of the layers a result makes (removed when the next slide opens).
RESULT_ROLES = (
    "attention",
    "soft attention",
    "sampled tiles",
    "glimpse paths",
    "glimpses",
    "glimpse fields",
)


@dataclass
class PartialResult:
    """The pieces of a grid-attention run that have arrived so far, shaped like the
    ``SlideResult`` attributes ``attention_layer_data`` reads."""

    pieces: list[PieceResult]
    classes: tuple[str, ...]

    @property
    def predicted(self) -> int:
        """The class of the most confident piece so far (the slide's call comes at the end)."""
        best = max(self.pieces, key=lambda p: float(np.max(p.probabilities)))
        return int(np.argmax(best.probabilities))

    @property
    def predicted_class(self) -> str:
        return f"{self.classes[self.predicted]}, {len(self.pieces)} piece(s) so far"


class Session:
    """The state the panels of one viewer share.

    Attributes:
        viewer: the napari viewer.
        slide: the slide on show (None before one opens).
        cohort: the cohort the slides come from (None without one).
        cohort_path: its CSV file.
        labels: the cohort's label store (None without a cohort).
        result: the latest model result for ``slide``.
        checkpoints: checkpoints offered in the Model panel, newest last.
        tissue: the tissue parameters the Slide panel set (None = the defaults); the
            Model panel runs with them.
    """

    slide_opened = Signal(object)  # the Slide
    result_shown = Signal(object)  # the SlideResult (or PartialResult as pieces arrive)
    cohort_opened = Signal(object)  # the Cohort
    checkpoint_added = Signal(str)  # a checkpoint path
    labels_changed = Signal(str)  # a slide key whose labels changed

    def __init__(self, viewer: napari.Viewer):
        self.viewer = viewer
        self.slide: Slide | None = None
        self.cohort: Cohort | None = None
        self.cohort_path: Path | None = None
        self.labels: LabelStore | None = None
        self.result: SlideResult | PartialResult | None = None
        self.checkpoints: list[str] = []
        self.tissue: TissueParams | None = None
        self._layers: dict[str, Any] = {}
        viewer.layers.events.inserted.connect(self._on_layer_inserted)

    @property
    def camera(self):
        """The viewer's camera (``viewer.scene.camera`` since napari 0.9)."""
        scene = getattr(self.viewer, "scene", None)
        return scene.camera if scene is not None else self.viewer.camera

    # -- coordinates -----------------------------------------------------------------
    @property
    def scale(self) -> tuple[float, float]:
        """Level-0 (y, x) world units (µm, or px without an mpp) per pixel of the slide."""
        return slide_scale(self.slide)[0] if self.slide is not None else (1.0, 1.0)

    @property
    def units(self) -> tuple[str, str]:
        return slide_scale(self.slide)[1] if self.slide is not None else ("pixel", "pixel")

    def to_world(self, x: float, y: float) -> tuple[float, float]:
        """Level-0 pixel (x, y) -> world (y, x), the slide layer's coordinates."""
        sy, sx = self.scale
        return y * sy, x * sx

    def to_level0(self, world_y: float, world_x: float) -> tuple[float, float]:
        """World (y, x) -> level-0 pixel (x, y)."""
        sy, sx = self.scale
        return world_x / sx, world_y / sy

    # -- layers ----------------------------------------------------------------------
    def layer(self, role: str):
        """The session's layer of this role, or None (never made, or the user removed it)."""
        layer = self._layers.get(role)
        if layer is not None and layer in self.viewer.layers:
            return layer
        self._layers.pop(role, None)
        return None

    def set_layer(self, role: str, data: Any, kwargs: dict[str, Any], kind: str):
        """Show ``data`` as the layer of ``role``: update it in place when it is there
        (keeping the user's display choices), else add it."""
        layer = self.layer(role)
        if layer is not None and type(layer).__name__.lower() == kind:
            with self.viewer.layers.events.blocker():
                self._update(layer, data, kwargs, kind)
            return layer
        if layer is not None:
            self.viewer.layers.remove(layer)
        layer = getattr(self.viewer, f"add_{kind}")(data, **kwargs)
        self._layers[role] = layer
        return layer

    @staticmethod
    def _update(layer, data: Any, kwargs: dict[str, Any], kind: str) -> None:
        for name in ("scale", "translate", "metadata", "name"):
            if name in kwargs:
                setattr(layer, name, kwargs[name])
        if kind == "shapes":
            layer.data = []
            if len(data):
                layer.add(data, shape_type=kwargs.get("shape_type", "rectangle"))
            for name in ("features", "edge_color", "text"):
                if name in kwargs and len(data):
                    setattr(layer, name, kwargs[name])
        else:
            layer.data = data
            if kind == "points" and "features" in kwargs:
                layer.features = kwargs["features"]

    def remove_layers(self, *roles: str) -> None:
        for role in roles:
            layer = self.layer(role)
            if layer is not None:
                self.viewer.layers.remove(layer)
            self._layers.pop(role, None)

    # -- slides ----------------------------------------------------------------------
    def open_slide(self, path: str | os.PathLike, mpp: float | None = None) -> Slide:
        """Open a slide and show it (replacing the previous one and its overlays).

        Raises:
            SlideError: the file is not a slide this plugin reads (the message names it).
        """
        slide = open_slide(path, mpp=mpp)
        ((data, kwargs, _),) = slide_layer_data(slide)
        self._forget_slide()
        self.slide = slide
        with self.viewer.layers.events.inserted.blocker(self._on_layer_inserted):
            added = self.viewer.add_image(data, **kwargs)
        # multichannel slides are one layer per channel
        for i, layer in enumerate(added if isinstance(added, list) else [added]):
            self._layers["slide" if i == 0 else f"slide channel {i}"] = layer
        layer = self._layers["slide"]
        self.viewer.layers.selection.active = layer
        self.viewer.reset_view()
        self.slide_opened.emit(slide)
        return slide

    def _forget_slide(self) -> None:
        channels = [role for role in self._layers if role.startswith("slide channel")]
        self.remove_layers("slide", *channels, "tissue", "regions", *RESULT_ROLES)
        if self.slide is not None:
            self.slide.close()
        self.result = None
        self.slide = None

    def _on_layer_inserted(self, event) -> None:
        """A slide opened through the reader (File > Open, drag and drop) becomes the
        session's slide."""
        layer = event.value
        slide = getattr(layer, "metadata", {}).get("slide")
        if not isinstance(slide, Slide) or slide is self.slide:
            return
        self._forget_slide()
        self.slide = slide
        self._layers["slide"] = layer
        self.slide_opened.emit(slide)

    # -- results ---------------------------------------------------------------------
    def show_result(self, result: SlideResult | PartialResult) -> None:
        """Show a model's result as layers over the slide (grid: the attention maps;
        dual: soft attention, sampled tiles and glimpses)."""
        scale, units = self.scale, self.units
        arrays = getattr(result, "arrays", {})
        if any(p.maps is not None for p in result.pieces):
            new = self.layer("attention") is None
            layer = self.set_layer("attention", *attention_layer_data(result, scale, units))
            if new:  # napari starts the map slider in the middle: show the strongest map
                self.viewer.dims.set_current_step(self.viewer.dims.ndim - layer.ndim, 0)
        else:
            self.remove_layers("attention")
        if "soft_attention" in arrays:
            data, kwargs, kind = soft_attention_layer_data(result, scale, units)
            self.set_layer("soft attention", data, {**kwargs, "visible": False}, kind)
            self.set_layer("sampled tiles", *sampled_tiles_layer_data(result, scale, units))
            roles = ("glimpse paths", "glimpses", "glimpse fields")
            for role, layer_data in zip(
                roles, glimpse_layer_data(result, scale, units), strict=True
            ):
                self.set_layer(role, *layer_data)
        else:
            self.remove_layers(*RESULT_ROLES[1:])
        self.result = result
        self.result_shown.emit(result)

    # -- cohorts, labels, checkpoints -------------------------------------------------
    def open_cohort(
        self, path: str | os.PathLike, labels: str | os.PathLike | None = None
    ) -> Cohort:
        """Read a cohort CSV and open its label store (by default next to the CSV).

        Raises:
            CohortError: the CSV cannot be used (the message names the line).
            LabelStoreError: the label store file is not one.
        """
        from ..labels import LabelStore
        from ..train.cohort import read_cohort

        cohort = read_cohort(path, check_files=False)
        store = LabelStore(labels or LabelStore.default_path(path))
        if self.labels is not None:
            self.labels.close()
        self.cohort, self.cohort_path, self.labels = cohort, Path(path), store
        self.cohort_opened.emit(cohort)
        return cohort

    def cohort_index(self) -> int | None:
        """The position of the open slide in the cohort, or None."""
        if self.cohort is None or self.slide is None:
            return None
        here = Path(self.slide.path).resolve()
        for i, entry in enumerate(self.cohort.entries):
            if Path(entry.slide).resolve() == here:
                return i
        return None

    def open_cohort_slide(self, index: int) -> Slide:
        """Open the cohort's slide at ``index`` (wrapping around)."""
        if self.cohort is None or not self.cohort.entries:
            raise ValueError("no cohort is open")
        entry = self.cohort.entries[index % len(self.cohort.entries)]
        return self.open_slide(entry.slide)

    def step_slide(self, step: int) -> Slide | None:
        """Open the next (+1) or previous (-1) slide of the cohort."""
        if self.cohort is None or not self.cohort.entries:
            return None
        here = self.cohort_index()
        return self.open_cohort_slide((-1 if here is None else here) + step)

    def add_checkpoint(self, path: str | os.PathLike) -> None:
        """Offer a checkpoint in the Model panel (e.g. a fine-tune's result)."""
        path = str(path)
        if path in self.checkpoints:
            self.checkpoints.remove(path)
        self.checkpoints.append(path)
        self.checkpoint_added.emit(path)


def connect_while_alive(widget: Any, connections: list[tuple[Any, Any]]) -> None:
    """Connect each (signal, slot) pair, and disconnect them all when Qt destroys
    ``widget``: the session and the viewer outlive a closed panel, and a signal must
    never reach a deleted widget.

    Bound methods are held weakly here (the signals hold them weakly too), so nothing
    keeps a closed panel alive: napari's dock close only unparents it, and the panel
    goes once Python lets go of it.
    """
    refs = []
    for signal, slot in connections:
        signal.connect(slot)
        refs.append((signal, weakref.WeakMethod(slot) if hasattr(slot, "__self__") else slot))
    widget.destroyed.connect(lambda *_: _disconnect(refs))


def _disconnect(refs: list[tuple[Any, Any]]) -> None:
    """Disconnect (signal, slot or weak method) pairs, ignoring those already gone."""
    for signal, ref in refs:
        slot = ref() if isinstance(ref, weakref.WeakMethod) else ref
        if slot is None:
            continue
        with contextlib.suppress(RuntimeError, TypeError, ValueError):
            signal.disconnect(slot)


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def session_for(viewer: napari.Viewer) -> Session:
    """The session of a viewer (made on first use)."""
    session = _SESSIONS.get(viewer)
    if session is None:
        session = _SESSIONS[viewer] = Session(viewer)
    return session
