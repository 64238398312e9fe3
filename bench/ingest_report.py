"""What ``bench/ingest.py`` measured: every round as it comes, then the best of each with
the ratios and a PASS/FAIL line per target of issue 15."""

from __future__ import annotations

import argparse
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

LOWER_IS_BETTER = {"MB", "s"}  # memory and time; rates are better higher


@dataclass
class Measure:
    label: str
    unit: str
    rounds: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.rounds) if self.unit in LOWER_IS_BETTER else max(self.rounds)


@dataclass(frozen=True)
class Target:
    check: str
    measure: str
    reference: str | None  # None: the target is on the measure itself, not a ratio
    comparison: str  # ">=", "<" or "<="
    bound: float | None  # None: shown for reference, no target


COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


# The labels the figures are recorded under (one per measurement, one value per round).
NODE_ALONE = "one association, node-only rounds: node"  # the rounds of the next two
SMALL_BESIDE_LARGE = "large transfer, small one beside: node"


def one_association(receiver: str) -> str:
    return f"one association: {receiver}"


def per_instance(receiver: str) -> str:
    return f"association per instance: {receiver}"


def concurrent(associations: int) -> str:
    return f"{associations} associations at once: node"


def memory_growth(megabytes: float, receiver: str) -> str:
    return f"{megabytes:g} MB instance, memory growth: {receiver}"


def cold_start(receiver: str) -> str:
    return f"cold start to an accepted association: {receiver}"


def targets(args: argparse.Namespace) -> list[Target]:
    node, orthanc, storescp = "node", "Orthanc", "storescp"
    return [
        Target("one association, node / Orthanc",
               one_association(node), one_association(orthanc), ">=", 2.0),
        Target("one association, node / storescp",
               one_association(node), one_association(storescp), ">=", 0.5),
        Target(f"{args.concurrency} associations / one, node",
               concurrent(args.concurrency), NODE_ALONE, ">=", 1.7),
        Target("large transfer with a small one beside / alone",
               SMALL_BESIDE_LARGE, NODE_ALONE, ">=", 0.8),
        Target("association per instance, node / Orthanc",
               per_instance(node), per_instance(orthanc), ">=", 1.0),
        Target("association per instance, node / storescp",
               per_instance(node), per_instance(storescp), ">=", None),
        Target(f"{args.multiframe_mb:g} MB instance, node memory growth (MB)",
               memory_growth(args.multiframe_mb, node), None, "<", 100.0),
        Target(f"{args.multiframe_mb:g} MB instance, Orthanc memory growth (MB)",
               memory_growth(args.multiframe_mb, orthanc), None, "<", None),
        Target("cold start to an accepted association, node (s)",
               cold_start(node), None, "<=", 3.0),
        Target("cold start to an accepted association, Orthanc (s)",
               cold_start(orthanc), None, "<=", None),
    ]  # fmt: skip


class Report:
    def __init__(self, header: str) -> None:
        self.header = header
        self.measures: dict[str, Measure] = {}
        self.notes: list[str] = []

    def add(self, label: str, value: float, unit: str = "inst/s") -> None:
        measure = self.measures.setdefault(label, Measure(label, unit))
        measure.rounds.append(value)
        print(f"  {label:<52} {value:9.2f} {unit}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  ({text})", flush=True)

    def render(self, args: argparse.Namespace) -> str:
        lines = ["", self.header, "", "Raw figures: best of the rounds, then every round in order"]
        for measure in self.measures.values():
            rounds = ", ".join(f"{value:.2f}" for value in measure.rounds)
            lines.append(
                f"  {measure.label:<52} {measure.best:9.2f} {measure.unit:<7} rounds: {rounds}"
            )
        lines += ["", "Notes"] + [f"  {note}" for note in self.notes]
        lines += ["", "Targets (best against best)", self._target_table(targets(args))]
        return "\n".join(lines)

    def _target_table(self, rows: list[Target]) -> str:
        out = [f"  {'check':<52} {'measured':>9}  {'best / best':<26} {'target':<8} result"]
        for target in rows:
            measure = self.measures.get(target.measure)
            reference = self.measures.get(target.reference) if target.reference else None
            if measure is None or (target.reference and reference is None):
                out.append(f"  {target.check:<52} {'-':>9}  {'':<26} {'':<8} not measured")
                continue
            if reference is None:
                value, measured, detail = measure.best, f"{measure.best:.2f}", ""
            else:
                value = measure.best / reference.best
                measured = f"{value:.3f}x"
                detail = f"{measure.best:.1f} / {reference.best:.1f} {measure.unit}"
            if target.bound is None:
                bound, result = "", "reference"
            else:
                bound = f"{target.comparison} {target.bound:g}"
                passed = COMPARISONS[target.comparison](value, target.bound)
                result = "PASS" if passed else "FAIL"
            out.append(f"  {target.check:<52} {measured:>9}  {detail:<26} {bound:<8} {result}")
        return "\n".join(out)
