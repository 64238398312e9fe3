"""The chaos suite of issue 18 at its full sizes, against a real node, DCMTK senders and a
real Orthanc:

    .venv/bin/python bench/chaos.py [--only load outage kills] [--seed N]
        [--senders 8 --instances 200] [--outage 300] [--studies 10 --kills 10]

1. load: ``--senders`` storescu processes at once, each a study of ``--instances``;
2. outage: the PACS stopped as the first output reaches it, down ``--outage`` seconds,
   started again on the same ports and storage;
3. kills: ``--studies`` studies sent one after the other, ``--kills`` SIGKILLs of the node
   (mid-association, mid-job, mid-export, during start-up, in turn; shuffled and timed by
   ``--seed``), the node started again on its data after each and the sender re-sending
   what it did not see acknowledged.

Each prints what it left: instances acknowledged / in the spool / indexed / lost, studies
processed, outputs, exports delivered, instances in the PACS, duplicates (an output
recorded, queued or stored more than once, or a PACS instance that is no output: 0),
lost (0), the C-STOREs the PACS stored (re-sends it absorbed), and the time to recover
(from the PACS's return, or the last restart, until everything is delivered).
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_node.testing_chaos import Census  # noqa: E402
from dicom_node.testing_chaos_runs import (  # noqa: E402
    KILL_POINTS,
    kill_run,
    load_run,
    pacs_down_run,
)


def report(name: str, result: Census, seconds: float) -> None:
    print(f"\n== {name} ({seconds:.0f} s)")
    for line in result.lines():
        print(f"   {line}")
    verdict = "ok" if result.lost == 0 and result.duplicates == 0 else "FAILED"
    print(f"   lost {result.lost}, duplicates {result.duplicates}: {verdict}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=["load", "outage", "kills"])
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--outage", type=float, default=300.0, help="seconds the PACS is down")
    parser.add_argument("--outage-instances", type=int, default=50)
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--kill-instances", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    # Stopped by a signal, still stop the node and Orthanc (the context managers' exits).
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    runs = args.only or ["load", "outage", "kills"]
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    failed = False
    root = Path(tempfile.mkdtemp(prefix="dicom-node-chaos-"))
    print(f"working in {root} (kept if a run fails)", flush=True)
    try:
        if "load" in runs:
            started = time.monotonic()
            result = load_run(root / "load", args.senders, args.instances)
            report(
                f"load: {args.senders} senders x {args.instances}",
                result,
                time.monotonic() - started,
            )
            failed |= bool(result.lost or result.duplicates)
        if "outage" in runs:
            started = time.monotonic()
            result = pacs_down_run(root / "outage", args.outage, args.outage_instances)
            report(f"PACS down {args.outage:g} s", result, time.monotonic() - started)
            failed |= bool(result.lost or result.duplicates)
        if "kills" in runs:
            points = [KILL_POINTS[i % len(KILL_POINTS)] for i in range(args.kills)]
            started = time.monotonic()
            result = kill_run(root / "kills", args.studies, points, args.kill_instances, seed)
            report(
                f"kill -9: {args.studies} studies, {args.kills} kills, seed {seed}",
                result,
                time.monotonic() - started,
            )
            failed |= bool(result.lost or result.duplicates)
    except BaseException:
        failed = True
        raise
    finally:
        if not failed:
            shutil.rmtree(root)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
