"""Receiver processes die with the node, even while they are still starting."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from dicom_node.receiver_pool import open_listener

SLOW_IMPORT = """
import sys
import time


class SlowReceiverImports:
    '''Makes importing pynetdicom (what the receiver's acceptor needs) take 20 s.'''

    def find_spec(self, name, path=None, target=None):
        if name == "pynetdicom":
            time.sleep(20)
        return None


sys.meta_path.insert(0, SlowReceiverImports())
"""

NODE_KILLED_WHILE_STARTING = """
import json, os, signal, sys
from pathlib import Path
from dicom_node.receiver_pool import start_receivers
from dicom_node.testing import local_settings

settings = local_settings(Path(sys.argv[1]), receiver_processes=2)
os.environ["PYTHONPATH"] = sys.argv[2]  # the receivers import slowly
pool = start_receivers(settings)
print(json.dumps({"port": settings.port}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 of the node in its start-up
"""


def test_receivers_of_a_node_killed_in_start_up_free_its_port_at_once(tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(textwrap.dedent(SLOW_IMPORT))
    output = tmp_path / "node.out"
    with output.open("w") as out:  # a file, not a pipe: the receivers share it
        node = subprocess.run(
            [sys.executable, "-c", NODE_KILLED_WHILE_STARTING, str(tmp_path), str(shim)],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    assert node.returncode == -9, output.read_text()
    port = json.loads(output.read_text().splitlines()[-1])["port"]
    # The node started again at once gets its port (before: held until the receivers had
    # imported everything, here 20 s).
    open_listener("127.0.0.1", port, retry_seconds=8).close()
