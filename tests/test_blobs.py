"""Difference-of-Gaussians blob detection (segflow.data.blobs): planted blobs are found."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from segflow.core.errors import SegflowError
from segflow.data.blobs import blob_features, check_sigmas, detect_blobs

# (row, col, radius) of three bright disks of different sizes.
PLANTED = ((16, 16, 3), (20, 60, 6), (60, 30, 9))


def _disks(planted=PLANTED, size: int = 96, contrast: float = 0.8) -> np.ndarray:
    image = np.full((size, size), 0.1, np.float32)
    for row, col, radius in planted:
        cv2.circle(image, (col, row), radius, 0.1 + contrast, thickness=-1)
    return image


def test_three_planted_blobs_are_three_blobs_at_their_places_and_sizes() -> None:
    blobs = detect_blobs(_disks(), sigmas=(1, 2, 4, 8), threshold=0.2)
    assert blobs.count == 3
    found = sorted(zip(map(tuple, blobs.centres.tolist()), blobs.radii.tolist(), strict=True))
    for (centre, radius), (row, col, planted_radius) in zip(found, sorted(PLANTED), strict=True):
        assert abs(centre[0] - row) <= 1 and abs(centre[1] - col) <= 1
        assert planted_radius / 2 <= radius <= planted_radius * 2  # the nearest octave


def test_no_blob_in_a_flat_image_and_a_count_that_follows_the_image() -> None:
    assert detect_blobs(np.full((40, 40), 0.5, np.float32), threshold=0.05).count == 0
    one = _disks(PLANTED[:1])
    assert detect_blobs(one, threshold=0.2).count == 1
    # Noise below the threshold adds nothing; a faint disk (contrast 0.2) is below it too.
    rng = np.random.default_rng(0)
    noisy = _disks() + rng.normal(0, 0.02, (96, 96)).astype(np.float32)
    assert detect_blobs(noisy, threshold=0.2).count == 3
    assert detect_blobs(_disks(contrast=0.2), threshold=0.2).count == 0


def test_blob_features_count_and_area_fractions() -> None:
    images = np.stack([_disks(), np.full((96, 96), 0.3, np.float32)])
    features = blob_features(images, (1, 2, 4, 8), 0.2)
    assert features.shape == (2, 3)
    assert features[0, 0] == 3 and features[1].tolist() == [0.0, 0.0, 0.0]
    largest = np.pi * 9**2 / 96**2
    assert largest / 3 < features[0, 2] < largest * 3
    assert features[0, 1] < features[0, 2]


@pytest.mark.parametrize("sigmas", [(1.0,), (2.0, 1.0), (0.0, 1.0), (1.0, 1.0)])
def test_bad_sigmas_are_refused(sigmas: tuple[float, ...]) -> None:
    with pytest.raises(SegflowError, match="sigmas"):
        check_sigmas(sigmas, "stack.blob_sigmas")


def test_bad_threshold_is_refused() -> None:
    with pytest.raises(SegflowError, match="threshold"):
        detect_blobs(np.zeros((8, 8), np.float32), threshold=0)
