"""What the plugin's panels share in one viewer: the slide on show, its cohort and label
store, the model's latest result and the checkpoints on offer.

One ``Session`` per viewer (``session_for``). Panels talk through its signals instead of
to each other, so each panel works alone (a test may open just one) and all of them
work together. The session owns the layers it makes, by role ("slide", "attention",
"sampled tiles", ...): showing a new result replaces its layers in place, so a
user's opacity or colormap choice survives the next run.

Layers the reader makes are adopted by their metadata: an image with ``"slide"`` becomes
the session's slide (a dropped slide), and the overlays of a dropped result folder
(``"result"``, ``"result_role"``) become the result's layers, so the panels treat a
dropped result as if it had just been run.
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
from .layers import RESULT_ROLES, result_layer_data, result_scale, slide_layer_data, slide_scale

if TYPE_CHECKING:
    import napari

    from ..labels import LabelStore
    from ..results import PieceResult, SlideResult
    from ..train.cohort import Cohort

__all__ = ["RESULT_ROLES", "PartialResult", "Session", "connect_while_alive", "session_for"]


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
        self._arriving: SlideResult | None = None  # a dropped result whose layers come in
        viewer.layers.events.inserted.connect(self._on_layer_inserted)
        for layer in list(viewer.layers):  # dropped before any panel made the session
            self._adopt(layer)

    @property
    def camera(self):
        """The viewer's camera (``viewer.scene.camera`` since napari 0.9)."""
        scene = getattr(self.viewer, "scene", None)
        return scene.camera if scene is not None else self.viewer.camera

    # -- coordinates -----------------------------------------------------------------
    @property
    def scale(self) -> tuple[float, float]:
        """Level-0 (y, x) world units (µm, or px without an mpp) per pixel of the slide
        (without a slide, of the slide the result on show was made on)."""
        return self._geometry(self.result)[0]

    @property
    def units(self) -> tuple[str, str]:
        return self._geometry(self.result)[1]

    def _geometry(self, result: Any) -> tuple[tuple[float, float], tuple[str, str]]:
        if self.slide is not None:
            return slide_scale(self.slide)
        if result is not None and hasattr(result, "slide_info"):
            return result_scale(result)
        return (1.0, 1.0), ("pixel", "pixel")

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
        # __class__, not type(): a panel's viewer is napari's PublicOnlyProxy, and so are
        # the layers made through it
        if layer is not None and layer.__class__.__name__.lower() == kind:
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
        return self.show_slide(open_slide(path, mpp=mpp))

    def show_slide(self, slide: Slide) -> Slide:
        """Show an opened slide (replacing the previous one and its overlays); the
        session owns it from here and closes it when the next slide opens."""
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
        self.remove_layers("slide", *channels, "tissue", "tissue pieces", "regions", *RESULT_ROLES)
        if self.slide is not None:
            self.slide.close()
        self.result = None
        self.slide = None

    def _on_layer_inserted(self, event) -> None:
        self._adopt(event.value)

    def _adopt(self, layer) -> None:
        """A slide opened through the reader (File > Open, drag and drop) becomes the
        session's slide; the overlays of a dropped result folder become its result's
        layers, and once all of them are in, the result on show."""
        metadata = getattr(layer, "metadata", None) or {}
        slide = metadata.get("slide")
        if isinstance(slide, Slide) and slide is not self.slide:
            self._forget_slide()
            self.slide = slide
            self._layers["slide"] = layer
            self.slide_opened.emit(slide)
        result = metadata.get("result")
        if result is None or result is self.result:
            return
        role = metadata.get("result_role")
        if role is not None:
            if self._arriving is not result:
                self._arriving = result
                # Without its slide (the reader did not find it) the overlays do not
                # belong over the slide on show: let it go as a new slide would.
                if self.slide is not None and not _shows(self.layer("slide"), result):
                    self._forget_slide()
                self.remove_layers(*RESULT_ROLES)  # the previous result's overlays
            previous = self.layer(role)
            if previous is not None and previous is not layer:
                self.viewer.layers.remove(previous)
            self._layers[role] = layer
            self._start_slider(role, layer)
        roles = metadata.get("result_roles", ())
        if all(_shows(self.layer(r), result) for r in roles):
            self._arriving = None
            self.result = result
            self.result_shown.emit(result)

    # -- results ---------------------------------------------------------------------
    def show_result(self, result: SlideResult | PartialResult) -> None:
        """Show a model's result as layers over the slide (grid: the attention maps;
        sliding window: the tile probabilities; dual: soft attention, sampled tiles and
        glimpses), replacing the previous result's layers in place."""
        scale, units = self._geometry(result)
        shown = []
        for role, (data, kwargs, kind) in result_layer_data(result, scale, units):
            new = self.layer(role) is None
            layer = self.set_layer(role, data, kwargs, kind)
            if new:
                self._start_slider(role, layer)
            shown.append(role)
        self.remove_layers(*(role for role in RESULT_ROLES if role not in shown))
        self._arriving = None
        self.result = result
        self.result_shown.emit(result)

    def _start_slider(self, role: str, layer) -> None:
        """napari starts a new layer's slider in the middle: show the strongest attention
        map, or the tile probabilities of the predicted class."""
        if role == "attention":
            step = 0
        elif role == "tile probabilities":
            step = int(layer.metadata.get("predicted_index", 0))
        else:
            return
        self.viewer.dims.set_current_step(self.viewer.dims.ndim - layer.ndim, step)

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


def _shows(layer: Any, result: Any) -> bool:
    """Whether ``layer`` is one of the reader's layers of ``result``."""
    return layer is not None and (layer.metadata or {}).get("result") is result


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
