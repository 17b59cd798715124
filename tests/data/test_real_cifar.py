"""Ingest the real shared CIFAR-10 (skipped only when the folder is absent)."""

import numpy as np
import pytest

from model_lib.data import ingest, load_arrays
from model_lib.sources import CIFAR10_CLASSES

pytestmark = pytest.mark.real_data


def test_real_cifar_slice_ingests_through_the_image_folder_path(cifar_slice, artifacts):
    info = ingest(str(cifar_slice), artifacts, log=lambda m: None)
    assert info.class_names == sorted(CIFAR10_CLASSES) and info.source.startswith("image_folder:")
    arrays = load_arrays(info.cache_dir)
    assert arrays.x_train.shape == (200, 32, 32, 3) and arrays.x_test.shape == (100, 32, 32, 3)
    assert np.bincount(arrays.y_test).tolist() == [10] * 10
    assert 60 < arrays.x_train.mean() < 180 and arrays.x_train.std() > 30  # real photos, not blanks


@pytest.mark.slow
def test_capped_ingest_of_the_full_folder_then_cache(cifar_dir, artifacts):
    lines = []
    first = ingest(str(cifar_dir), artifacts, max_train_images=300, max_test_images=100, log=lines.append)
    assert (first.train_count, first.test_count) == (300, 100) and not first.from_cache
    second = ingest(str(cifar_dir), artifacts, max_train_images=300, max_test_images=100, log=lines.append)
    assert second.from_cache and second.fingerprint == first.fingerprint
    assert any("served from cache" in line for line in lines)
