"""A small line plot drawn with QPainter (the plugin carries no plotting library): named
series, a frame with the data's minimum and maximum on both axes, and a legend."""

from __future__ import annotations

import math
from collections.abc import Iterable

from qtpy.QtCore import QPointF, QRectF, QSize, Qt
from qtpy.QtGui import QColor, QFontMetrics, QPainter, QPalette, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["LinePlot"]

# Colour-blind-safe (Tableau 10), readable on napari's dark and light themes.
COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948")
_PAD = 6  # px between the frame, its labels and the widget's edge
_SWATCH = 14  # px, a legend entry's line


class LinePlot(QWidget):
    """A line plot of named series that share the axes.

    Args:
        title: drawn above the frame (may be empty).
        x_label: the x axis's name, drawn under it (may be empty).
        parent: the parent widget.
    """

    def __init__(self, title: str = "", x_label: str = "", parent: QWidget | None = None):
        super().__init__(parent)
        self.title = title
        self.x_label = x_label
        self._series: dict[str, tuple[list[float], list[float], QColor, bool]] = {}
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        self.setMinimumHeight(120)

    def sizeHint(self) -> QSize:
        return QSize(320, 170)

    # -- data ----------------------------------------------------------------------------
    def set_series(
        self,
        name: str,
        xs: Iterable[float],
        ys: Iterable[float | None],
        *,
        colour: str | None = None,
        markers: bool = False,
    ) -> None:
        """Shows (or replaces) the series ``name``; points whose y is None or not finite
        are left out.

        Args:
            name: the series' name in the legend (its order is the order of first set).
            xs, ys: the points.
            colour: a Qt colour name; by default the next of ``COLOURS``.
            markers: draw a dot at every point (a series of one point always gets one).
        """
        points = [
            (float(x), float(y))
            for x, y in zip(xs, ys, strict=True)
            if y is not None and math.isfinite(float(x)) and math.isfinite(float(y))
        ]
        if colour is None and name in self._series:
            chosen = self._series[name][2]
        else:
            chosen = QColor(colour or COLOURS[len(self._series) % len(COLOURS)])
        self._series[name] = ([p[0] for p in points], [p[1] for p in points], chosen, markers)
        self.update()

    def series(self, name: str) -> tuple[list[float], list[float]]:
        """Returns the points of a series as shown (x values, y values).

        Raises:
            KeyError: no series of that name.
        """
        xs, ys, _, _ = self._series[name]
        return list(xs), list(ys)

    @property
    def names(self) -> list[str]:
        """Returns the series' names, in legend order."""
        return list(self._series)

    def clear(self) -> None:
        """Removes every series."""
        self._series.clear()
        self.update()

    # -- drawing -------------------------------------------------------------------------
    def _ranges(self) -> tuple[float, float, float, float] | None:
        """Returns (x0, x1, y0, y1) over every point, never empty, or None without data."""
        xs = [x for s in self._series.values() for x in s[0]]
        ys = [y for s in self._series.values() for y in s[1]]
        if not xs:
            return None
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        if x1 == x0:
            x0, x1 = x0 - 0.5, x1 + 0.5
        if y1 == y0:
            half = abs(y0) * 0.05 or 0.5
            y0, y1 = y0 - half, y1 + half
        return x0, x1, y0, y1

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        try:
            painter.setRenderHint(QPainter.Antialiasing)
            self._draw(painter)
        finally:
            painter.end()

    def _legend(self, metrics: QFontMetrics, width: float) -> list[tuple[str, QPointF]]:
        """Returns where each legend entry starts: left to right under the axis, wrapped
        to the widget's width (so the legend never hides a line)."""
        places, x, y = [], float(_PAD), 0.0
        for name in self._series:
            entry = _SWATCH + 4 + metrics.horizontalAdvance(name) + 12
            if x > _PAD and x + entry > width - _PAD:
                x, y = float(_PAD), y + metrics.height()
            places.append((name, QPointF(x, y)))
            x += entry
        return places

    def _draw(self, painter: QPainter) -> None:
        text = self.palette().color(QPalette.WindowText)
        faint = QColor(text)
        faint.setAlpha(110)
        metrics = QFontMetrics(self.font())
        line = metrics.height()
        ranges = self._ranges()
        legend = self._legend(metrics, self.width())
        legend_height = (legend[-1][1].y() + line) if legend else 0
        y_labels = [_label(v) for v in ranges[2:]] if ranges else [""]
        left = _PAD + max(metrics.horizontalAdvance(s) for s in y_labels) + 4
        top = _PAD + (line + 2 if self.title else 0)
        bottom = self.height() - _PAD - line - 2 - legend_height
        right = self.width() - _PAD
        frame = QRectF(left, top, max(right - left, 10), max(bottom - top, 10))
        painter.setPen(text)
        if self.title:
            painter.drawText(QRectF(0, _PAD, self.width(), line), Qt.AlignHCenter, self.title)
        painter.setPen(QPen(faint, 1))
        painter.drawRect(frame)
        if ranges is None:
            painter.drawText(frame, Qt.AlignCenter, "no data yet")
            return
        x0, x1, y0, y1 = ranges
        painter.setPen(text)
        below = QRectF(frame.left(), frame.bottom() + 2, frame.width(), line)
        painter.drawText(below, Qt.AlignLeft | Qt.AlignTop, _label(x0))
        painter.drawText(below, Qt.AlignRight | Qt.AlignTop, _label(x1))
        if self.x_label:
            painter.drawText(below, Qt.AlignHCenter | Qt.AlignTop, self.x_label)
        beside = QRectF(_PAD, 0, frame.left() - _PAD - 4, line)
        y_low, y_high = y_labels
        painter.drawText(beside.translated(0, frame.top()), Qt.AlignRight, y_high)
        painter.drawText(beside.translated(0, frame.bottom() - line), Qt.AlignRight, y_low)

        # inside the frame by a few px, so lines at the extremes stay visible
        inner = frame.adjusted(3, 3, -3, -3)

        def at(x: float, y: float) -> QPointF:
            return QPointF(
                inner.left() + (x - x0) / (x1 - x0) * inner.width(),
                inner.bottom() - (y - y0) / (y1 - y0) * inner.height(),
            )

        for xs, ys, colour, markers in self._series.values():
            points = [at(x, y) for x, y in zip(xs, ys, strict=True)]
            painter.setPen(QPen(colour, 1.6))
            if len(points) > 1:
                painter.drawPolyline(QPolygonF(points))
            if markers or len(points) == 1:
                painter.setBrush(colour)
                for point in points:
                    painter.drawEllipse(point, 2.5, 2.5)
                painter.setBrush(Qt.NoBrush)
        top = below.bottom() + 2
        for name, place in legend:
            middle = top + place.y() + line / 2
            painter.setPen(QPen(self._series[name][2], 2.5))
            painter.drawLine(QPointF(place.x(), middle), QPointF(place.x() + _SWATCH, middle))
            painter.setPen(text)
            label = QRectF(place.x() + _SWATCH + 4, top + place.y(), self.width(), line)
            painter.drawText(label, Qt.AlignLeft | Qt.AlignVCenter, name)


def _label(value: float) -> str:
    """Returns an axis end's label: three significant digits."""
    return f"{value:.3g}"
