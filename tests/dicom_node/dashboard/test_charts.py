"""Bar charts laid out for inline SVG."""

from __future__ import annotations

import pytest

from dicom_node.dashboard.charts import bar_chart


def test_bars_scale_to_the_peak_and_carry_their_values() -> None:
    chart = bar_chart([0.0, 1.0, 4.0], ["a", "b", "c"], unit="instances/s")
    heights = [bar.height for bar in chart.bars]
    assert heights[0] == 0 and heights[2] == chart.plot_height
    assert heights[1] == pytest.approx(chart.plot_height / 4, abs=0.01)
    assert [bar.y + bar.height for bar in chart.bars] == [chart.plot_height] * 3
    assert chart.bars[1].title == "b: 1.00 instances/s"
    assert chart.peak_label == "4.00 instances/s"
    assert (chart.first_label, chart.last_label) == ("a", "c")
    assert chart.bars[0].x < chart.bars[1].x < chart.bars[2].x < chart.width


def test_a_chart_of_zeros_stays_flat() -> None:
    chart = bar_chart([0, 0], ["a", "b"], unit="studies", value_format="{:.0f}")
    assert [bar.height for bar in chart.bars] == [0, 0]
    assert chart.summary == "peak 0 studies"
