"""Benchmark every built-in processor against its reference call, in the same run.

    python bench/processors.py [--device cpu|cuda:0] [--shape 200 512 512] [--only a,b]
                               [--repeat 3] [--json out.json]

The volume is a synthetic CT phantom (HU). The reference is always the CPU library call
(scipy.ndimage, scikit-image, scikit-learn) on the host array. On the CPU the ratio is
processor time / reference time (target <= 1.2). On a GPU the input is copied to the device
once (not timed, as in a pipeline); the first call (kernel compilation, CuPy's caches) is
reported separately, then the best of ``--repeat`` calls, synchronised, and the ratio is
reference CPU time / GPU time (targets: gaussian >= 20, median >= 30, label >= 14,
nlm >= 50).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import scipy.stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import best_of

from dicom_node.synthetic import make_phantom
from processors.api import run_on_backend
from processors.backend import Backend, resolve, to_device
from processors.base import Volume
from processors.features import (
    GLCM_ANGLES,
    GLCM_PROPS,
    HAAR_TYPES,
    FeaturesParams,
    representative_slices,
)
from processors.registry import discover, get_processor
from processors.segment import body_mask, keep_components

GPU_TARGETS = {"gaussian": 20.0, "median": 30.0, "label": 14.0, "nlm": 50.0}
CPU_TARGET = 1.2
HEAVY = {"nlm", "median", "bilateral", "clahe", "kmeans", "kmeans_body", "features", "predict"}


@dataclass
class Case:
    label: str
    processor: str | None  # None: a building block timed through ``run_block``
    params: dict[str, Any]
    reference: Callable[[np.ndarray], Any]
    run_block: Callable[[Backend, Any], Any] | None = None
    note: str = ""


@dataclass
class Row:
    label: str
    reference_s: float
    processor_s: float
    first_s: float
    ratio: float
    target: str
    ok: bool | None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ references


def ref_statistics(image: np.ndarray, labels: np.ndarray, k: int) -> list[Any]:
    """What the segment and cluster processors also report, written plainly with NumPy."""
    out = []
    for label in range(1, k + 1):
        values = image[labels == label]
        out.append((values.size, values.mean(), values.std(), values.min(), values.max()))
    return out


def ref_body(spacing: tuple[float, float, float]) -> Callable[[np.ndarray], Any]:
    """The processor's own mask function called directly on NumPy, with the statistics:
    the body mask has no library equivalent, so this measures the processor's overhead."""

    def reference(image: np.ndarray) -> Any:
        body = body_mask(np, Volume(image, spacing=spacing, modality="CT")).astype(np.uint8)
        return body, ref_statistics(image, body, 1)

    return reference


def ref_label(mask: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(mask, ndi.generate_binary_structure(3, 1))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    order = np.argsort(-sizes[1:], kind="stable") + 1
    largest = order[:2]
    lut = np.zeros(count + 1, np.uint16)
    lut[largest[sizes[largest] > 0]] = 1
    return lut[labels]


def ref_kmeans(
    image: np.ndarray, k: int, sample_size: int, inside: np.ndarray | None = None
) -> Any:
    """sklearn's KMeans on a sample of the (inside) voxels, then every voxel labelled."""
    from sklearn.cluster import KMeans

    values = image if inside is None else image[inside]
    x = ((values - values.mean()) / values.std()).reshape(-1, 1).astype(np.float32)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(x.shape[0], size=min(sample_size, x.shape[0]), replace=False))
    model = KMeans(n_clusters=k, n_init=1, random_state=0).fit(x[pick])
    if inside is None:
        labels = model.predict(x).reshape(image.shape) + 1
    else:
        labels = np.zeros(image.shape, np.int32)
        labels[inside] = model.predict(x) + 1
    return labels, ref_statistics(image, labels, k)


def ref_kmeans_in_body(
    spacing: tuple[float, float, float], k: int, sample_size: int
) -> Callable[[np.ndarray], Any]:
    def reference(image: np.ndarray) -> Any:
        inside = body_mask(np, Volume(image, spacing=spacing, modality="CT"))
        return ref_kmeans(image, k, sample_size, inside)

    return reference


def ref_features(image: np.ndarray) -> dict[str, float]:
    from skimage.feature import SIFT, graycomatrix, graycoprops, haar_like_feature
    from skimage.transform import integral_image, resize

    params = FeaturesParams()
    mask = image > -500.0
    region = image[mask].astype(np.float64)
    out = {
        "mean": region.mean(),
        "std": region.std(),
        "p": np.percentile(region, [10, 50, 90]),
        "skew": scipy.stats.skew(region),
        "kurt": scipy.stats.kurtosis(region),
        "hist": np.histogram(region, 64, (region.min(), region.max()))[0],
    }
    for z in representative_slices(np, mask, params.n_slices):
        plane = image[z]
        q = np.clip(np.floor((plane + 1000.0) / 2000.0 * 32), 0, 31).astype(np.uint8)
        glcm = graycomatrix(q, [1], list(GLCM_ANGLES), levels=32, symmetric=True, normed=True)
        for prop in GLCM_PROPS:
            out[prop] = graycoprops(glcm, prop).mean()
        unit = (plane - plane.min()) / (plane.max() - plane.min())
        sift = SIFT(upsampling=1, n_octaves=4)
        sift.detect(unit.astype(np.float64))
        small = resize(unit.astype(np.float64), (12, 12), anti_aliasing=True)
        haar_like_feature(integral_image(small), 0, 0, 12, 12, list(HAAR_TYPES))
    return out


def ref_predict(image: np.ndarray) -> Any:
    from processors.predict import load_model, model_path

    ref_features(image)
    model = load_model(model_path("demo-lesion-presence"))
    vector = np.zeros((1, len(model.feature_names)))
    return model.pipeline.predict_proba(vector)


def cases(spacing: tuple[float, float, float], nonneg_offset: float) -> list[Case]:
    from skimage.exposure import equalize_adapthist, equalize_hist, rescale_intensity
    from skimage.restoration import denoise_bilateral, denoise_nl_means

    sigma_vox = tuple(1.0 / s for s in spacing)
    in_plane_sigma = 1.0 / spacing[1]
    win = 2 * max(2, math.ceil(3 * in_plane_sigma)) + 1

    def bilateral_ref(a: np.ndarray) -> np.ndarray:
        shifted = (a + nonneg_offset).astype(np.float64)
        return np.stack(
            [
                denoise_bilateral(
                    s,
                    win_size=win,
                    sigma_color=50.0,
                    sigma_spatial=in_plane_sigma,
                    mode="symmetric",
                )
                for s in shifted
            ]
        )

    def label_block(backend: Backend, mask: Any) -> Any:
        return keep_components(backend.xp, mask, 1, 2, 0, False)

    return [
        Case("mean", "mean", {"size": 3}, lambda a: ndi.uniform_filter(a, 3)),
        Case("median", "median", {"size": 3}, lambda a: ndi.median_filter(a, 3)),
        Case(
            "gaussian", "gaussian", {"sigma_mm": 1.0}, lambda a: ndi.gaussian_filter(a, sigma_vox)
        ),
        Case(
            "nlm",
            "nlm",
            {"patch_size": 5, "patch_distance": 2, "h": 10.0, "sigma": 12.0},
            lambda a: denoise_nl_means(
                a, patch_size=5, patch_distance=2, h=10.0, sigma=12.0, fast_mode=True
            ),
        ),
        Case(
            "bilateral",
            "bilateral",
            {"sigma_spatial_mm": 1.0, "sigma_range": 50.0, "in_plane": True},
            bilateral_ref,
            note="reference: skimage denoise_bilateral slice by slice",
        ),
        Case(
            "window",
            "window",
            {"level": 40.0, "width": 400.0},
            lambda a: rescale_intensity(a, in_range=(-160.0, 240.0), out_range=(0.0, 1.0)),
        ),
        Case("histeq", "histeq", {}, lambda a: equalize_hist(a, 256)),
        Case(
            "clahe",
            "clahe",
            {},
            lambda a: equalize_adapthist(
                rescale_intensity(a, out_range=(0.0, 1.0)).astype(np.float32)
            ),
        ),
        Case(
            "threshold_segment",
            "threshold_segment",
            {"preset": "body"},
            ref_body(spacing),
            note="reference: processors.segment.body_mask called directly + statistics",
        ),
        Case(
            "label",
            None,
            {},
            lambda a: ref_label(a > -500.0),
            run_block=label_block,
            note="connected components + sizes + keep the 2 largest, of the voxels above -500 HU",
        ),
        Case(
            "kmeans",
            "kmeans",
            {"k": 3, "sample_size": 200_000, "inside_body": False},
            lambda a: ref_kmeans(a, 3, 200_000),
            note="every voxel, as sklearn's KMeans",
        ),
        Case(
            "kmeans_body",
            "kmeans",
            {"k": 3, "sample_size": 200_000},
            ref_kmeans_in_body(spacing, 3, 200_000),
            note="default: inside the body mask; reference: body_mask + sklearn's KMeans",
        ),
        Case("features", "features", {}, ref_features),
        Case(
            "predict",
            "predict",
            {},
            ref_predict,
            note="reference: features reference + the model's pipeline",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", type=int, nargs=3, default=(200, 512, 512))
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.25, 0.7, 0.7))
    parser.add_argument("--only", default="")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    backend = resolve(args.device)
    # The bench's own device work (masks, resampling, synchronize) runs on the chosen GPU too.
    with backend.on_device():
        measure(args, backend)


def measure(args: argparse.Namespace, backend: Backend) -> None:
    shape = tuple(args.shape)
    spacing = (args.spacing[0], args.spacing[1], args.spacing[2])
    started = time.perf_counter()
    image = make_phantom(shape, spacing, lesion_radius_mm=15.0, seed=0).values  # type: ignore[arg-type]
    print(
        f"phantom {shape} in {time.perf_counter() - started:.1f} s; device {backend.device}",
        flush=True,
    )
    plugins = discover()
    selected = [
        c for c in cases(spacing, 1100.0) if not args.only or c.label in args.only.split(",")
    ]
    device_image = to_device(image, backend)
    volume = Volume(device_image, spacing=spacing, modality="CT")
    rows: list[Row] = []
    for case in selected:
        heavy = case.label in HEAVY
        repeat = 1 if heavy and not backend.is_gpu else args.repeat
        ref_first, ref_best = best_of(lambda c=case: c.reference(image), 0 if heavy else repeat)
        if case.run_block is not None:
            mask = device_image > -500.0
            first, best = best_of(
                lambda c=case, m=mask: c.run_block(backend, m), repeat, backend.xp
            )
        else:
            assert case.processor is not None
            processor = get_processor(case.processor, plugins)
            params = processor.Params(**case.params)
            first, best = best_of(
                lambda p=processor, q=params: run_on_backend(p, volume, q, backend),
                repeat if (backend.is_gpu or not heavy) else 0,
                backend.xp,
            )
        reference = ref_best if not heavy else ref_first
        if backend.is_gpu:
            ratio = reference / best
            target = GPU_TARGETS.get(case.label)
            ok = None if target is None else ratio >= target
            target_text = f">= {target:g}x" if target else "-"
        else:
            ratio = best / reference
            ok = ratio <= CPU_TARGET
            target_text = f"<= {CPU_TARGET}"
        row = Row(case.label, reference, best, first, ratio, target_text, ok, case.note)
        rows.append(row)
        print(
            f"{row.label:18s} ref {row.reference_s:8.3f} s  processor {row.processor_s:8.3f} s "
            f"(first {row.first_s:7.3f} s)  ratio {row.ratio:7.2f}  target {row.target:8s} "
            f"{'ok' if ok else ('-' if ok is None else 'MISSED')}",
            flush=True,
        )
    print()
    print(markdown(rows, backend, shape))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": backend.device,
                    "shape": shape,
                    "spacing": spacing,
                    "cpu": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "rows": [row.__dict__ for row in rows],
                },
                indent=2,
            ),
            encoding="utf-8",
        )


def markdown(rows: list[Row], backend: Backend, shape: tuple[int, ...]) -> str:
    ratio_name = "CPU ref / GPU" if backend.is_gpu else "processor / ref"
    lines = [
        f"| processor | reference (CPU) s | {backend.device} s | first call s | {ratio_name} "
        "| target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        met = "-" if r.ok is None else ("yes" if r.ok else "no")
        lines.append(
            f"| {r.label} | {r.reference_s:.3f} | {r.processor_s:.3f} | {r.first_s:.3f} | "
            f"{r.ratio:.2f} | {r.target} | {met} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
