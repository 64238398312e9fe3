"""The tiled whole-slide model (dicom_node.slide): tiles read on demand, cache, levels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels.utils import pixel_array

from dicom_node.security.crypto import write_data_file
from dicom_node.security.keys import KeyRing
from dicom_node.slide import Slide, SlideError, choose_level, slide_spacing
from dicom_node.testing_slide import Disc, disc_truth, slide_header, write_disc_slide

WSI = Path(__file__).resolve().parents[1] / "data" / "wsi"


def total_matrix(path: Path) -> np.ndarray:
    """The whole total pixel matrix of a small TILED_FULL file, from all its frames."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    frames = pixel_array(path)
    down = -(-ds.TotalPixelMatrixRows // ds.Rows)
    across = -(-ds.TotalPixelMatrixColumns // ds.Columns)
    tiles = frames.reshape(down, across, ds.Rows, ds.Columns, *frames.shape[3:])
    matrix = np.concatenate([np.concatenate(list(row), axis=1) for row in tiles], axis=0)
    return matrix[: ds.TotalPixelMatrixRows, : ds.TotalPixelMatrixColumns]


@pytest.mark.parametrize("name", ["sm_image.dcm", "sm_image_jpegls.dcm", "sm_image_dots.dcm"])
def test_a_region_of_a_real_colour_slide_is_its_tiles_scaled_to_one(name: str) -> None:
    expected = total_matrix(WSI / "sm_image.dcm" if "jpegls" in name else WSI / name) / 255.0
    with Slide(WSI / name) as slide:
        assert slide.colour and slide.shape == (50, 50) and slide.tile_shape == (10, 10)
        region = slide.read_region(7, 13, 31, 22)  # across tile borders
        assert region.dtype == np.float32 and region.shape == (31, 22, 3)
        np.testing.assert_allclose(region, expected[7:38, 13:35], atol=1e-6)
        assert slide.spacing == pytest.approx((0.000499, 0.000499))


def test_a_greyscale_slide_reads_its_stored_values() -> None:
    path = WSI / "sm_image_grayscale.dcm"
    with Slide(path) as slide:
        assert not slide.colour
        np.testing.assert_array_equal(slide.read_region(0, 0, 50, 50), total_matrix(path))


def test_tiles_are_decoded_on_demand_and_the_cache_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "slide.dcm"
    write_disc_slide(path, rows=300, columns=400, discs=[Disc(150, 200, 60)], tile=64)
    with Slide(path, cache_tiles=3) as slide:
        assert slide.tile_count == 5 * 7
        slide.read_region(0, 0, 10, 10)
        assert slide.decoded == 1  # one tile, not the slide
        slide.read_region(0, 0, 300, 400)
        assert slide.cached == 3 and slide.decoded == 35 and slide.hits == 1  # tile 1 kept
    with Slide(path, cache_tiles=64) as slide:
        first = slide.read_region(60, 60, 100, 100)
        decoded = slide.decoded
        again = slide.read_region(60, 60, 100, 100)
        assert slide.decoded == decoded == 9 and slide.hits == 9
        np.testing.assert_array_equal(first, again)


def test_a_sparse_slide_reads_its_tiles_where_they_are_and_padding_elsewhere(
    tmp_path: Path,
) -> None:
    discs = [Disc(40, 40, 20), Disc(200, 300, 30, stain=1)]
    full, sparse = tmp_path / "full.dcm", tmp_path / "sparse.dcm"
    write_disc_slide(full, rows=256, columns=384, discs=discs, tile=64)
    write_disc_slide(sparse, rows=256, columns=384, discs=discs, tile=64, sparse=True)
    with Slide(full) as whole, Slide(sparse) as tiled:
        assert tiled.tile_count < whole.tile_count
        dense, holes = whole.read_region(0, 0, 256, 384), tiled.read_region(0, 0, 256, 384)
    truth = disc_truth(discs, 0, 0, 256, 384) > 0
    np.testing.assert_array_equal(holes[truth], dense[truth])  # every disc pixel is there
    present = np.any(holes != 1.0, axis=-1)
    assert np.all(holes[~present] == 1.0) and present.sum() < present.size  # white padding


def test_a_sparse_tile_off_the_grid_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sparse.dcm"
    write_disc_slide(path, rows=128, columns=128, discs=[Disc(64, 64, 30)], tile=64, sparse=True)
    ds = pydicom.dcmread(path)
    ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSlideSequence[
        0
    ].RowPositionInTotalImagePixelMatrix = 5
    ds.save_as(path)
    with pytest.raises(SlideError, match="off the grid"):
        Slide(path)


def test_a_file_that_is_no_slide_is_refused() -> None:
    with pytest.raises(SlideError, match="not a VL Whole Slide"):
        Slide(Path(str(pydicom.data.get_testdata_file("SC_rgb.dcm"))))


def test_the_highest_resolution_volume_level_is_chosen_and_the_rest_named() -> None:
    def level(rows: int, kind: str = "VOLUME") -> tuple[Path, pydicom.Dataset]:
        header = slide_header(rows, rows, 64, True, 0.0005, rows, None, kind)
        return Path(f"{kind}-{rows}.dcm"), header

    instances = [level(512), level(2048), level(1024), level(300, "LABEL"), level(256, "OVERVIEW")]
    choice = choose_level(instances)
    assert choice.path == Path("VOLUME-2048.dcm")
    assert choice.ignored == (
        "1 LABEL image(s) of the slide ignored",
        "1 OVERVIEW image(s) of the slide ignored",
        "2 lower-resolution pyramid level(s) ignored: the 2048x2048 level is processed",
    )
    with pytest.raises(SlideError, match="only LABEL/OVERVIEW"):
        choose_level([level(300, "LABEL")])


def test_pixel_spacing_comes_from_the_shared_pixel_measures() -> None:
    header = slide_header(1000, 2000, 256, True, 0.00025, 0, None)
    assert slide_spacing(header) == (0.00025, 0.00025)
    del header.SharedFunctionalGroupsSequence
    assert slide_spacing(header) == pytest.approx((0.00025, 0.00025))  # imaged volume / matrix
    del header.ImagedVolumeWidth
    assert slide_spacing(header) is None


def test_an_encrypted_slide_is_read_through_its_keys(tmp_path: Path) -> None:
    plain, sealed = tmp_path / "plain.dcm", tmp_path / "sealed.dcm"
    write_disc_slide(plain, rows=200, columns=300, discs=[Disc(100, 150, 50)], tile=64)
    keys = KeyRing.generate()
    write_data_file(sealed, plain.read_bytes(), keys)
    assert sealed.read_bytes()[:8] != plain.read_bytes()[:8]
    with Slide(plain) as clear, Slide(sealed, keys) as hidden:
        np.testing.assert_array_equal(
            hidden.read_region(30, 40, 150, 200), clear.read_region(30, 40, 150, 200)
        )
