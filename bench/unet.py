"""The ``unet`` processor on a 512x512x200 CT against ONNX Runtime on the raw model, one run.

    .venv/bin/python bench/unet.py [--device cpu|cuda:0] [--slices 200] [--size 512]
                                   [--repeat 2] [--batch-size 2] [--json out.json]

The volume is a generated chest CT phantom (``make_ct_case``) at 0.7 x 0.7 x 2.5 mm. The
processor does everything a job does: reorientation, resampling to the model grid
(2.0 x 2.0 x 2.5 mm), normalisation, sliding-window inference with Gaussian blending,
resampling of the probabilities back to 512x512 and the argmax, per-segment statistics.
The reference is the model's own cost: ONNX Runtime (the same execution provider) run
once on the whole model-grid volume, already resampled and normalised, no patches, no
blending. The ratio processor / reference is the price of the pipeline around the model
(patch overlap, resampling, blending). ``threshold_segment`` (body preset) is timed as
well, for scale. Best of ``--repeat`` runs after one warm-up (session creation, caches).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

# bench/processors.py would shadow the processors package: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import best_of

from processors.api import run_on_backend
from processors.backend import Backend, parse_device, resolve, to_device
from processors.base import Volume
from processors.model import (
    UNET_MANIFEST,
    InferenceOptions,
    cpu_session,
    cuda_session,
    load_segmentation_model,
    normalize,
    resample_linear,
    segment_volume,
    target_shape,
)
from processors.models.unet_phantoms import make_ct_case
from processors.registry import discover, get_processor


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    backend = resolve(args.device)
    # The bench's own device work (masks, resampling, synchronize) runs on the chosen GPU too.
    with backend.on_device():
        measure(args, backend)


def measure(args: argparse.Namespace, backend: Backend) -> None:
    xp = backend.xp
    spacing = (2.5, 0.7, 0.7)
    t0 = time.perf_counter()
    case = make_ct_case(42, (args.slices, args.size, args.size), spacing)
    print(f"phantom {case.image.shape} generated in {time.perf_counter() - t0:.1f} s")
    volume = Volume(to_device(case.image, backend), spacing=spacing, modality="CT")
    model = load_segmentation_model(UNET_MANIFEST)
    infos = discover()
    unet = get_processor("unet", infos)
    params = unet.Params(batch_size=args.batch_size)
    threshold = get_processor("threshold_segment", infos)
    threshold_params = threshold.Params(preset="body")

    # The reference input: the model grid, resampled and normalised once, untimed.
    grid = target_shape(volume.shape, spacing, (2.5, 2.0, 2.0))
    padded = tuple(math.ceil(n / 8) * 8 for n in grid)
    image = normalize(xp, resample_linear(xp, volume.array, grid), model.manifest.normalization)
    image = xp.pad(image, [(0, p - n) for p, n in zip(padded, grid, strict=True)])
    host_image = np.ascontiguousarray(
        image.get() if hasattr(image, "get") else image, dtype=np.float32
    )[None, None]
    session = None
    if backend.is_gpu:
        session = cuda_session(model.model_path, parse_device(backend.device)[1])
    session = session or cpu_session(model.model_path)
    provider = session.get_providers()[0]

    def reference() -> None:
        session.run(["logits"], {"image": host_image})

    def processor() -> None:
        run_on_backend(unet, volume, params, backend)

    def labels_only() -> None:
        segment_volume(model, volume, xp, InferenceOptions(batch_size=args.batch_size))

    def threshold_call() -> None:
        run_on_backend(threshold, volume, threshold_params, backend)

    rows = {}
    for label, call in (
        ("onnxruntime, whole model grid (reference)", reference),
        ("unet processor (labels + statistics)", processor),
        ("unet labels only (segment_volume)", labels_only),
        ("threshold_segment body", threshold_call),
    ):
        first, best = best_of(call, args.repeat, xp)
        rows[label] = {"first_s": round(first, 3), "best_s": round(best, 3)}
        print(f"{label:45s} first {first:7.2f} s   best {best:7.2f} s", flush=True)
    ratio = (
        rows["unet processor (labels + statistics)"]["best_s"]
        / rows["onnxruntime, whole model grid (reference)"]["best_s"]
    )
    print(f"model grid {grid} (padded {padded}), provider {provider}")
    print(f"ratio processor / raw onnxruntime: {ratio:.2f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": backend.device,
                    "provider": provider,
                    "shape": list(volume.shape),
                    "model_grid": list(grid),
                    "rows": rows,
                    "ratio": round(ratio, 3),
                    "python": platform.python_version(),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
