"""Geometry for model inference: the patient axes of a volume, reorientation to a model's
axes (transposes and flips only) and back, and linear resampling between grids."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from processors.base import ProcessorError
from processors.model_manifest import axis_of

Array = Any

_AXIS_LETTERS = {("x", 1): "L", ("x", -1): "R", ("y", 1): "P", ("y", -1): "A"}
_AXIS_LETTERS |= {("z", 1): "S", ("z", -1): "I"}
_OPPOSITE = {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}


def axis_codes(orientation: tuple[float, ...]) -> tuple[str, str, str]:
    """Patient directions (LPS letters) of increasing (slice, row, column) index."""
    row = np.asarray(orientation[:3], dtype=np.float64)  # along a row: column index grows
    col = np.asarray(orientation[3:], dtype=np.float64)  # down a column: row index grows
    normal = np.cross(row, col)
    letters = []
    for vector in (normal, col, row):
        axis = int(np.argmax(np.abs(vector)))
        letters.append(_AXIS_LETTERS[("xyz"[axis], 1 if vector[axis] > 0 else -1)])
    if len({axis_of(letter) for letter in letters}) != 3:
        raise ProcessorError(f"cannot tell the axes of orientation {orientation}")
    return (letters[0], letters[1], letters[2])


def reorientation(
    source: tuple[str, str, str], target: str
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """(permutation, flips) taking a (slice, row, column) array with ``source`` codes to
    one whose axes are ``target`` read as (column, row, slice) letters, e.g. "LPS"."""
    wanted = (target[2], target[1], target[0])
    perm: list[int] = []
    flips: list[bool] = []
    for letter in wanted:
        for index, code in enumerate(source):
            if code == letter or code == _OPPOSITE[letter]:
                perm.append(index)
                flips.append(code != letter)
                break
    return (perm[0], perm[1], perm[2]), (flips[0], flips[1], flips[2])


def apply_reorientation(
    xp: ModuleType, array: Array, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]
) -> Array:
    out = xp.transpose(array, perm)
    for axis, flip in enumerate(flips):
        if flip:
            out = xp.flip(out, axis=axis)
    return out


def undo_reorientation(
    xp: ModuleType, array: Array, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]
) -> Array:
    for axis, flip in enumerate(flips):
        if flip:
            array = xp.flip(array, axis=axis)
    inverse = tuple(int(i) for i in np.argsort(perm))
    return xp.transpose(array, inverse)


def target_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, int, int]:
    """The grid size that covers the same extent at ``target`` spacing."""
    z, y, x = (max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True))
    return (z, y, x)


def resample_linear(xp: ModuleType, array: Array, shape: tuple[int, int, int]) -> Array:
    """Resample ``array`` linearly onto ``shape`` voxels covering the same extent.

    Voxel centres map as ``(i + 0.5) * n_in / n_out - 0.5`` (the grids share their outer
    edges) and positions beyond the outer voxel centres take the edge value: the same
    numbers as ``ndimage.affine_transform(order=1, mode="nearest")`` with that diagonal
    matrix, computed one axis at a time (two gathers and a multiply-add per axis), which
    is several times faster than the general transform on large outputs.
    """
    out = xp.asarray(array, dtype=xp.float32)
    if tuple(out.shape) == tuple(shape):
        return out
    # Shrinking axes first keeps the intermediate arrays small.
    order = sorted(range(3), key=lambda axis: shape[axis] / out.shape[axis])
    for axis in order:
        n_in, n_out = int(out.shape[axis]), int(shape[axis])
        if n_in == n_out:
            continue
        coords = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1.0)
        lower = np.floor(coords).astype(np.int64)
        upper = np.minimum(lower + 1, n_in - 1)
        view = [1, 1, 1]
        view[axis] = n_out
        weight = xp.asarray((coords - lower).astype(np.float32)).reshape(view)
        low = xp.take(out, xp.asarray(lower), axis=axis)
        high = xp.take(out, xp.asarray(upper), axis=axis)
        high -= low
        high *= weight
        low += high
        out = low
    return out
