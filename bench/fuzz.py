"""Fuzz the receive path of a running ``dicom-node serve`` with hostile PDU sequences and
hostile data sets, and print what it answered, case by case counted.

    .venv/bin/python -P bench/fuzz.py [--cases 10000]

Half the cases are PDU sequences (garbage, lying lengths, PDUs out of order, truncated and
oversized PDUs, unknown types), half C-STORE requests on a proper association whose data
set is hostile (path-like, over-long or blank UIDs, bad VRs, lying element lengths,
sequences nested thousands deep, truncations, flipped bytes, the wrong transfer syntax).
After every case the node must answer a C-ECHO on a new association, must have written
nothing outside its data folder, and must have answered a data set whose UIDs are not
valid with a failure status. The cases come from tests/dicom_node/ae/fuzz_cases.py, which
the CI suite (tests/dicom_node/ae/test_fuzz.py) runs with fewer examples. The node runs
with its defaults (receiver processes, fsync) and short timeouts, so that a case that
stalls ends in seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_node.testing import running_node  # noqa: E402
from tests.dicom_node.ae.fuzz_cases import (  # noqa: E402
    PDU_SEQUENCES,
    FuzzCounts,
    HostileDataSet,
    PduStep,
    echo_status,
    files_outside,
    hostile_data_sets,
    is_valid_uid,
    send_hostile_data_set,
    send_pdu_sequence,
)

NODE_ENV = {
    "DICOM_NODE_ACSE_TIMEOUT": "2",
    "DICOM_NODE_NETWORK_TIMEOUT": "2",
    "DICOM_NODE_DIMSE_TIMEOUT": "2",
    "DICOM_NODE_MAX_PDU_SIZE": "16384",
    "DICOM_NODE_STUDY_QUIET_SECONDS": "3600",
}


def check_whole(port: int, root: Path, data_dir: Path, problems: list[str], label: str) -> None:
    try:
        status = echo_status(port)
        if status != 0:
            problems.append(f"{label}: C-ECHO answered {status:#06x}")
    except Exception as exc:  # the point is to count it, whatever it is
        problems.append(f"{label}: no C-ECHO answer: {exc}")
    outside = [path for path in files_outside(root, data_dir) if path.suffix != ".log"]
    if outside:
        problems.append(f"{label}: files outside the data folder: {outside[:3]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases in all")
    args = parser.parse_args()
    half = args.cases // 2
    problems: list[str] = []
    sequences, data_sets = FuzzCounts(), FuzzCounts()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as temp:
        root = Path(temp)
        data_dir = root / "data"
        with running_node(data_dir, env=NODE_ENV) as node:
            started = time.perf_counter()
            quiet = settings(
                max_examples=half,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )

            @quiet
            @given(steps=PDU_SEQUENCES)
            def sequence_case(steps: list[PduStep]) -> None:
                try:
                    answer = send_pdu_sequence(node.port, steps)
                except AssertionError as exc:
                    answer = "kept open"
                    problems.append(f"PDU sequence {[step.label for step in steps]}: {exc}")
                sequences.add("+".join(step.label for step in steps[:1]), answer)
                check_whole(node.port, root, data_dir, problems, "after a PDU sequence")

            @quiet
            @given(case=hostile_data_sets())
            def data_set_case(case: HostileDataSet) -> None:
                status, answer = send_hostile_data_set(node.port, case)
                if status == 0 and not is_valid_uid(case.sop_instance_uid):
                    problems.append(f"success for SOP instance UID {case.sop_instance_uid!r}")
                data_sets.add(case.label, answer)
                check_whole(node.port, root, data_dir, problems, f"after a {case.label} case")

            sequence_case()
            data_set_case()
            elapsed = time.perf_counter() - started
            still_up = node.process.poll() is None
    cases = sequences.cases + data_sets.cases
    print(f"{cases} cases in {elapsed:.0f} s; node up at the end: {still_up}")
    for title, counts in (("PDU sequences", sequences), ("hostile data sets", data_sets)):
        print(f"\n{title}: {counts.cases} cases")
        print(
            "  first step / mutation: "
            + ", ".join(f"{k} {v}" for k, v in counts.by_mutation.most_common())
        )
        print("  answered:")
        for answer, count in counts.by_answer.most_common(15):
            print(f"    {count:6d}  {answer}")
        if len(counts.by_answer) > 15:
            print(f"    ... and {len(counts.by_answer) - 15} other answers")
    print(f"\nproblems: {len(problems)}")
    for problem in problems[:20]:
        print(f"  {problem}")
    return 1 if problems or not still_up else 0


if __name__ == "__main__":
    sys.exit(main())
