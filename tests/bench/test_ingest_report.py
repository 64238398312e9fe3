"""bench/ingest_report.py: best of the rounds, ratios and PASS/FAIL per target."""

from __future__ import annotations

import argparse

from bench.ingest_report import Report

ARGS = argparse.Namespace(concurrency=4, multiframe_mb=400.0)


def row(table: str, check: str) -> str:
    return next(line for line in table.splitlines() if line.strip().startswith(check))


def test_rates_take_the_best_round_and_the_target_is_on_the_ratio() -> None:
    report = Report("header")
    for rate in (100.0, 130.0, 120.0):
        report.add("one association: node", rate)
    for rate in (60.0, 50.0, 70.0):
        report.add("one association: Orthanc", rate)
    line = row(report.render(ARGS), "one association, node / Orthanc")
    assert "1.857x" in line
    assert "130.0 / 70.0 inst/s" in line
    assert line.endswith("FAIL")


def test_memory_and_time_take_the_lowest_round() -> None:
    report = Report("header")
    for megabytes in (120.0, 95.0):
        report.add("400 MB instance, memory growth: node", megabytes, "MB")
    report.add("cold start to an accepted association: node", 3.5, "s")
    table = report.render(ARGS)
    assert row(table, "400 MB instance, node memory growth").endswith("PASS")
    assert "95.00" in row(table, "400 MB instance, node memory growth")
    assert row(table, "cold start to an accepted association, node").endswith("FAIL")


def test_what_was_not_measured_says_so_and_references_have_no_verdict() -> None:
    report = Report("header")
    report.add("association per instance: node", 10.0)
    report.add("association per instance: storescp", 20.0)
    table = report.render(ARGS)
    assert row(table, "association per instance, node / Orthanc").endswith("not measured")
    assert row(table, "association per instance, node / storescp").endswith("reference")
