"""Bar charts as inline SVG, laid out here and drawn by ``templates/_charts.html``: no
chart library, no script, nothing fetched from elsewhere."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

WIDTH = 720
HEIGHT = 160
AXIS_SPACE = 18


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str  # the tooltip: the bucket and its value


@dataclass(frozen=True)
class BarChart:
    width: int
    height: int
    plot_height: int
    bars: list[Bar]
    peak_label: str  # the top of the scale, as text
    first_label: str
    last_label: str
    summary: str  # what the chart says, for screen readers and tests


def bar_chart(
    values: Sequence[float],
    labels: Sequence[str],
    *,
    unit: str,
    value_format: str = "{:.2f}",
) -> BarChart:
    """One bar per value, scaled to the largest (a chart of zeros stays flat)."""
    plot_height = HEIGHT - AXIS_SPACE
    peak = max(values, default=0.0)
    slot = WIDTH / max(1, len(values))
    bars = []
    for index, (value, label) in enumerate(zip(values, labels, strict=True)):
        height = 0.0 if peak <= 0 else plot_height * value / peak
        bars.append(
            Bar(
                x=round(index * slot + slot * 0.1, 2),
                y=round(plot_height - height, 2),
                width=round(slot * 0.8, 2),
                height=round(height, 2),
                title=f"{label}: {value_format.format(value)} {unit}",
            )
        )
    return BarChart(
        width=WIDTH,
        height=HEIGHT,
        plot_height=plot_height,
        bars=bars,
        peak_label=f"{value_format.format(peak)} {unit}",
        first_label=labels[0] if labels else "",
        last_label=labels[-1] if labels else "",
        summary=f"peak {value_format.format(peak)} {unit}",
    )
