"""Encryption at rest: its cost on ingest, against the same node in clear, in one run.

    .venv/bin/python bench/encryption.py [--rounds 5] [--slices 200] [--reference-tree DIR]

The rules of ``bench/ingest.py``: DCMTK storescu sends one association of N 512x512 CT
slices; every node gets the same bytes under UIDs it has never seen, in every round; the
nodes take turns within each round (the order rotating) and those not measured are frozen;
dirty pages are flushed before every timed transfer; the best of N rounds is reported with
every round listed, and the rate counts from the first byte sent to the last instance
indexed. The nodes run ``dicom-node serve`` on their defaults (fsync before every
acknowledgement, SQLite index); one has ``spool_encryption_key_file`` set.

``--reference-tree DIR`` adds a third node in clear that runs the code of another checkout
(say, main before encryption existed): the plain node's ratio to it shows what the change
costs a node with encryption off.

Also printed: the raw AES-256-GCM throughput of this machine on 64 KiB segments (OpenSSL
through ``cryptography``), and that of ``EncryptingWriter`` fed 16 KiB pieces, as the
receive path feeds it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from bench.ingest import (  # noqa: E402
    Copies,
    Receiver,
    load_average,
    node_receiver,
    rotated,
    send,
    tail_bytes,
)
from bench.ingest_support import (  # noqa: E402
    SeriesTemplate,
    frames_for_megabytes,
    frozen,
    sampled_memory,
    write_multiframe,
)
from dicom_node.security.crypto import SEGMENT_BYTES, EncryptingWriter, open_data_file  # noqa: E402
from dicom_node.security.keys import KeyRing, write_key_file  # noqa: E402
from dicom_node.synthetic import generate_series  # noqa: E402
from dicom_node.testing import NodeProcess, running_node  # noqa: E402

MB = 1e6


class _NullSink:
    """Takes what a writer writes and keeps nothing."""

    def write(self, data: bytes | memoryview) -> int:
        return len(data)


def gigabytes_per_second(run: Callable[[], object], nbytes: int, seconds: float = 1.0) -> float:
    """Best of repeated runs for about ``seconds``."""
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e9


def raw_throughput() -> list[str]:
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    nonce = os.urandom(12)
    segments = [os.urandom(SEGMENT_BYTES) for _ in range(64)]
    sealed = [aead.encrypt(nonce, segment, None) for segment in segments]
    total = SEGMENT_BYTES * len(segments)

    def encrypt_each() -> None:
        for segment in segments:  # each result dropped at once, as the writer drops it
            aead.encrypt(nonce, segment, None)

    def decrypt_each() -> None:
        for segment in sealed:
            aead.decrypt(nonce, segment, None)

    encrypt = gigabytes_per_second(encrypt_each, total)
    decrypt = gigabytes_per_second(decrypt_each, total)
    piece = os.urandom(16 * 1024)
    keys = KeyRing.generate()

    def stream() -> None:
        writer = EncryptingWriter(_NullSink(), keys)  # type: ignore[arg-type]
        for _ in range(total // len(piece)):
            writer.write(piece)
        writer.finish()

    streamed = gigabytes_per_second(stream, total)
    return [
        f"AES-256-GCM on 64 KiB segments, one core: encrypt {encrypt:.2f} GB/s,"
        f" decrypt {decrypt:.2f} GB/s",
        f"EncryptingWriter fed 16 KiB pieces: {streamed:.2f} GB/s",
    ]


def stored_path(node: NodeProcess, sop_instance_uid: str) -> Path:
    from sqlalchemy import create_engine, select

    from db.models import Instance

    engine = create_engine(node.database_url)
    with engine.connect() as connection:
        path = connection.scalar(
            select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid)
        )
    engine.dispose()
    return Path(str(path))


def large_instance(node: NodeProcess, root: Path, megabytes: float, keys: KeyRing) -> str:
    """One large multi-frame instance to the encrypting node: its memory growth, and that
    what it stored decrypts to the pixels sent."""
    slices = generate_series(num_slices=16, uid_seed="bench-multiframe").datasets
    source = np.stack([ds.pixel_array.clip(0, 4095).astype(np.uint16) for ds in slices])
    sent = root / "multiframe.dcm"
    frames = frames_for_megabytes(megabytes, source.shape[1], source.shape[2])
    uid = str(write_multiframe(sent, source, frames).SOPInstanceUID)
    receiver = node_receiver(node)
    receiver.expected = receiver.stored_count()  # the rounds' instances: wait for one more
    with sampled_memory(receiver.pid) as memory:
        elapsed = send(receiver, [sent])
    stored = stored_path(node, uid)
    plaintext = root / "decrypted.dcm"
    with open_data_file(stored, keys) as stream, plaintext.open("wb") as copy:
        while chunk := stream.read(8 << 20):
            copy.write(chunk)
    pixels = sent.stat().st_size - 1024  # everything but the headers, which may differ
    same = tail_bytes(plaintext, pixels) == tail_bytes(sent, pixels)
    return (
        f"{sent.stat().st_size / MB:.0f} MB multi-frame instance to the encrypting node in"
        f" {elapsed:.1f} s: memory growth {memory.growth_bytes / MB:.0f} MB (RSS of its"
        f" processes, sampled and high-water marks); stored {stored.stat().st_size / MB:.1f}"
        f" MB, pixel data decrypted {'identical' if same else 'DIFFERENT'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="best of N rounds (default 5)")
    parser.add_argument("--slices", type=int, default=200, help="CT slices per association")
    parser.add_argument("--reference-tree", type=Path, help="a checkout whose node runs in clear")
    parser.add_argument(
        "--multiframe-mb", type=float, default=400, help="large instance size; 0 skips"
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.slices < 1:
        parser.error("--rounds and --slices must be at least 1")
    started = time.perf_counter()
    for line in raw_throughput():
        print(line, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-encryption-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        template = SeriesTemplate.from_datasets(
            generate_series(num_slices=args.slices, uid_seed="bench").datasets
        )
        write_key_file(root / "key", KeyRing.generate().keys)
        configurations = {
            "in clear": {},
            "encrypted": {"DICOM_NODE_SPOOL_ENCRYPTION_KEY_FILE": str(root / "key")},
        }
        if args.reference_tree is not None:
            tree = str(args.reference_tree.resolve())
            configurations["reference in clear"] = {"PYTHONPATH": tree}
        nodes: list[Receiver] = []
        processes: dict[str, NodeProcess] = {}
        for name, env in configurations.items():
            data_dir = root / name.replace(" ", "-") / "data"
            processes[name] = stack.enter_context(running_node(data_dir, env=env))
            receiver = node_receiver(processes[name])
            receiver.name = name
            nodes.append(receiver)
        print(
            f"{args.slices} slices of 512x512 CT per association"
            f" ({template.size_bytes / MB:.0f} MB), best of {args.rounds} rounds;"
            f" {os.cpu_count()} cores, {load_average()}",
            flush=True,
        )
        copies = Copies(template, root)
        rates: dict[str, list[float]] = {node.name: [] for node in nodes}
        note = ""
        for round_index in range(args.rounds):
            for node in rotated(tuple(nodes), round_index):
                others = [peer.pid for peer in nodes if peer is not node]
                with copies() as files, frozen(others):
                    rates[node.name].append(len(files) / send(node, files))
            print(
                f"round {round_index + 1}: "
                + ", ".join(f"{name} {values[-1]:.0f}" for name, values in rates.items()),
                flush=True,
            )
        if args.multiframe_mb > 0:
            others = [node.pid for node in nodes if node.name != "encrypted"]
            with frozen(others):
                keys = KeyRing.from_file(root / "key")
                note = large_instance(processes["encrypted"], root, args.multiframe_mb, keys)
    best = {name: max(values) for name, values in rates.items()}
    print("\ninstances/s, best of each (every round):")
    for name, values in rates.items():
        print(f"  {name:20} {best[name]:6.0f}   ({', '.join(f'{v:.0f}' for v in values)})")
    ratios = [("encrypted", "in clear")]
    if "reference in clear" in best:
        ratios.append(("in clear", "reference in clear"))
    for measured, reference in ratios:
        per_round = [m / r for m, r in zip(rates[measured], rates[reference], strict=True)]
        print(
            f"{measured} / {reference}: {best[measured] / best[reference]:.3f} best of each,"
            f" {statistics.median(per_round):.3f} median of the rounds' ratios"
        )
    if args.reference_tree is not None:
        print(f"reference tree: {args.reference_tree}")
    if note:
        print(note)
    print(f"\nwhole run: {time.perf_counter() - started:.0f} s; {load_average()}")


if __name__ == "__main__":
    main()
