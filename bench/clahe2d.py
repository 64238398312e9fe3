"""CLAHE on a mammogram-sized 2-D image: the node's processor against scikit-image's call.

    .venv/bin/python bench/clahe2d.py [--rows 3000] [--columns 2400] [--repeats 3]

A synthetic 16-bit mammogram-like frame (a smooth breast shape over background, with
noise) goes through ``run_processor("clahe", ...)`` as a planar Volume, and the same
array, scaled to [0, 1], through ``skimage.exposure.equalize_adapthist``; each is timed
``--repeats`` times, interleaved, and the best of each is printed with their ratio (the
issue's target: within 1.2x). The two outputs are checked to agree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from processors.api import run_processor
from processors.base import ImageResult, Volume


def mammogram(rows: int, columns: int) -> np.ndarray:
    y, x = np.mgrid[:rows, :columns].astype(np.float32)
    breast = ((y - rows / 2) / (0.45 * rows)) ** 2 + (x / (0.8 * columns)) ** 2 <= 1.0
    tissue = 1500 + 800 * np.sin(y / 97.0) * np.cos(x / 61.0)
    noise = np.random.default_rng(0).normal(0, 60, (rows, columns))
    return np.where(breast, tissue + noise, 100 + noise).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--columns", type=int, default=2400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from skimage.exposure import equalize_adapthist

    image = mammogram(args.rows, args.columns)
    volume = Volume(image[None], planar=True, modality="MG")
    node: list[float] = []
    reference: list[float] = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = run_processor("clahe", volume)[0]
        node.append(time.perf_counter() - start)
        start = time.perf_counter()
        unit = (image - image.min()) / (image.max() - image.min())
        expected = equalize_adapthist(unit)
        reference.append(time.perf_counter() - start)
    assert isinstance(result, ImageResult)
    agree = float(np.abs(result.volume.array[0] - expected).max())
    print(
        f"CLAHE {args.rows}x{args.columns}: node {min(node):.2f} s, scikit-image "
        f"{min(reference):.2f} s, ratio {min(node) / min(reference):.2f}x "
        f"(best of {args.repeats}; max difference {agree:.2g})"
    )


if __name__ == "__main__":
    main()
