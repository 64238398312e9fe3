"""``make demo-ui``: the demo's Orthanc, node and study, left running with the dashboard.

Starts a private Orthanc as the PACS and the node with the rule ``ct-default`` and its
dashboard (on ``DASHBOARD_PORT``, else 8080 when free, else a free port), sends a generated
CT study, makes an admin token, prints the dashboard's address and the token, and runs
until Ctrl-C (or SIGTERM), then stops the node and Orthanc. Everything lives under
``.demo/``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import threading
from types import FrameType

from demo import WORK, admin_token, demo_node, generate_study, send_study

from dicom_node.testing import free_port, running_orthanc

PREFERRED_PORT = 8080


def dashboard_port() -> int:
    if "DASHBOARD_PORT" in os.environ:
        return int(os.environ["DASHBOARD_PORT"])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        if probe.connect_ex(("127.0.0.1", PREFERRED_PORT)) != 0:
            return PREFERRED_PORT
    return free_port()


def main() -> int:
    stop = threading.Event()

    def stop_on(signum: int, _frame: FrameType | None) -> None:
        print(f"\n== {signal.Signals(signum).name}: stopping", flush=True)
        stop.set()

    signal.signal(signal.SIGINT, stop_on)
    signal.signal(signal.SIGTERM, stop_on)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    generate_study()
    http_port = dashboard_port()
    print("== starting Orthanc as the PACS (Debian package, storage in .demo/orthanc)", flush=True)
    with running_orthanc(WORK / "orthanc") as orthanc, demo_node(orthanc, http_port) as node:
        send_study(node)
        token = admin_token(node, "demo-ui-admin")
        print(
            f"""
== the dashboard: http://127.0.0.1:{http_port}/
   sign in with this admin token (shown once; `dicom-node tokens create` makes more):
   {token}
   Orthanc (the PACS): {orthanc.url}/app/explorer.html
   the node's DICOM port: {node.port} (AE DICOMNODE); its log: {node.log_path}
== running until Ctrl-C""",
            flush=True,
        )
        while not stop.wait(1.0):
            if node.process.poll() is not None:
                print(f"== the node exited with {node.process.returncode}", file=sys.stderr)
                return 1
    print("== stopped: the node and Orthanc", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
