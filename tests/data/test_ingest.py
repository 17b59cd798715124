import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from model_lib.data import ingest, load_arrays, train_rows
from model_lib.images import decode_rgb
from model_lib.sources import DatasetError, resolve_source
from tests.conftest import CLASS_COLOURS, write_colour_dataset

quiet = dict(log=lambda message: None, workers=2)


def test_image_folder_is_decoded_into_cached_arrays(colour_dataset, artifacts):
    info = ingest(str(colour_dataset), artifacts, **quiet)
    assert info.class_names == sorted(CLASS_COLOURS) and (info.train_count, info.test_count) == (36, 12)
    arrays = load_arrays(info.cache_dir)
    assert arrays.x_train.shape == (36, 32, 32, 3) and arrays.x_train.dtype == np.uint8
    assert np.bincount(arrays.y_train).tolist() == [12, 12, 12]
    # Folder "blue" is class 0; its images are mostly blue.
    blue = arrays.x_train[arrays.y_train == 0].mean(axis=(0, 1, 2))
    assert blue[2] > 150 and blue[0] < 80
    assert Path(info.cache_dir).parent == artifacts / "datasets"
    # Training reads the same rows by position, in any order, without loading the array.
    rows = train_rows(info.cache_dir)
    np.testing.assert_array_equal(rows[[35, 0, 7, 7]], arrays.x_train[[35, 0, 7, 7]])
    assert rows[2:2].shape == (0, 32, 32, 3) and len(rows) == 36 and not list(artifacts.glob("datasets/.tmp-*"))


def test_second_ingest_is_served_from_cache_and_changes_invalidate_it(colour_dataset, artifacts):
    first = ingest(str(colour_dataset), artifacts, **quiet)
    again = ingest(str(colour_dataset), artifacts, **quiet)
    assert again.from_cache and again.fingerprint == first.fingerprint
    (colour_dataset / "train" / "red" / "new.png").write_bytes(
        (colour_dataset / "train" / "red" / "000.png").read_bytes()
    )
    changed = ingest(str(colour_dataset), artifacts, **quiet)
    assert not changed.from_cache and changed.fingerprint != first.fingerprint and changed.train_count == 37


def test_images_of_any_size_and_format_are_resized(tmp_path, artifacts):
    from PIL import Image

    root = write_colour_dataset(tmp_path / "d", train_per_class=1, test_per_class=1)
    Image.new("L", (300, 120), 90).save(root / "train" / "red" / "big_grey.jpg")
    Image.new("RGBA", (7, 9), (0, 0, 255, 128)).save(root / "train" / "blue" / "tiny.webp")
    info = ingest(str(root), artifacts, image_size=16, **quiet)
    assert load_arrays(info.cache_dir).x_train.shape == (5, 16, 16, 3)


def test_corrupt_file_is_named_in_the_error_or_skipped_on_request(colour_dataset, artifacts):
    broken = colour_dataset / "train" / "green" / "broken.jpg"
    broken.write_bytes(b"<html>not a picture</html>")
    with pytest.raises(DatasetError, match=r"broken\.jpg: not an image"):
        ingest(str(colour_dataset), artifacts, **quiet)
    info = ingest(str(colour_dataset), artifacts, skip_corrupt=True, **quiet)
    assert info.train_count == 36 and len(info.skipped_files) == 1 and "broken.jpg" in info.skipped_files[0]


def test_non_image_files_are_ignored(colour_dataset, artifacts):
    (colour_dataset / "train" / "red" / "notes.txt").write_text("hello")
    (colour_dataset / "train" / "red" / ".DS_Store").write_bytes(b"\0\1")
    assert ingest(str(colour_dataset), artifacts, **quiet).train_count == 36


def test_links_out_of_the_data_folder_are_refused(colour_dataset, tmp_path, artifacts):
    outside = tmp_path / "outside.png"
    outside.write_bytes((colour_dataset / "train" / "red" / "000.png").read_bytes())
    os.symlink(outside, colour_dataset / "train" / "red" / "link.png")
    with pytest.raises(DatasetError, match="link points outside"):
        ingest(str(colour_dataset), artifacts, **quiet)


@pytest.mark.parametrize("link", ["train/purple", "test/red"])
def test_class_folder_links_out_of_the_data_folder_are_refused(colour_dataset, tmp_path, artifacts, link):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "000.png").write_bytes((colour_dataset / "train" / "red" / "000.png").read_bytes())
    target = colour_dataset / link
    if target.exists():
        shutil.rmtree(target)
    os.symlink(outside, target)
    with pytest.raises(DatasetError, match=rf"{link}: link points outside the data folder"):
        ingest(str(colour_dataset), artifacts, **quiet)


def test_class_folder_links_inside_the_data_folder_are_followed(colour_dataset, artifacts):
    os.symlink(colour_dataset / "test" / "red", colour_dataset / "test" / "crimson")
    os.symlink(colour_dataset / "train" / "red", colour_dataset / "train" / "crimson")
    assert ingest(str(colour_dataset), artifacts, **quiet).class_names == ["blue", "crimson", "green", "red"]


def test_capped_subset_is_class_balanced(colour_dataset, artifacts):
    info = ingest(str(colour_dataset), artifacts, max_train_images=9, max_test_images=3, **quiet)
    arrays = load_arrays(info.cache_dir)
    assert np.bincount(arrays.y_train).tolist() == [3, 3, 3] and np.bincount(arrays.y_test).tolist() == [1, 1, 1]


def test_missing_or_malformed_sources_are_explained(tmp_path, artifacts):
    with pytest.raises(DatasetError, match="data folder not found"):
        resolve_source(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a dataset"):
        resolve_source(str(tmp_path / "empty"))
    write_colour_dataset(tmp_path / "bad", train_per_class=1, test_per_class=1)
    (tmp_path / "bad" / "test" / "dog").mkdir(parents=True)
    with pytest.raises(DatasetError, match="classes not in train/: dog"):
        ingest(str(tmp_path / "bad"), artifacts, **quiet)


def _write_batches(root: Path, per_batch: int = 10) -> np.ndarray:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        first = data if first is None else first
        batch = {b"data": data, b"labels": list(range(per_batch)), b"batch_label": name.encode()}
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return first


def test_cifar_python_batches_are_read(tmp_path, artifacts):
    first = _write_batches(tmp_path / "cifar-10-batches-py")
    info = ingest(str(tmp_path), artifacts, **quiet)
    arrays = load_arrays(info.cache_dir)
    assert (info.train_count, info.test_count) == (50, 10) and info.class_names[3] == "c3"
    # Channel-planar rows become HWC images.
    np.testing.assert_array_equal(arrays.x_train[0, :, :, 1].ravel(), first[0, 1024:2048])


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_batch_files_holding_arbitrary_objects_are_refused(tmp_path, artifacts):
    root = tmp_path / "cifar-10-batches-py"
    _write_batches(root)
    (root / "data_batch_2").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(DatasetError, match=r"data_batch_2: not a valid CIFAR batch file \(refusing to load"):
        ingest(str(root), artifacts, **quiet)


def test_photo_sized_copies_decode_to_the_original_pixels(upscaled_cifar):
    """Training and prediction share `decode_rgb`; a 640x480 JPEG copy shrinks back close to the original."""
    originals, photos = upscaled_cifar
    names = sorted(path.relative_to(originals) for path in originals.rglob("*.jpg"))
    original = np.stack([decode_rgb(originals / name, (32, 32))[0] for name in names]).astype(np.float32)
    shrunk = np.stack([decode_rgb(photos / name, (32, 32))[0] for name in names]).astype(np.float32)
    per_image = np.abs(shrunk - original).mean(axis=(1, 2, 3))
    # Measured on these 300 images: mean 2.3, worst 5.1 levels of 255 (JPEG q90 + bicubic both ways).
    assert per_image.mean() < 3.5 and per_image.max() < 8, (per_image.mean(), per_image.max())
    # Swapped channel order, the classic mismatch, is far outside that: 20 levels on average.
    swapped = np.abs(shrunk[..., ::-1] - original).mean(axis=(1, 2, 3))
    assert swapped.mean() > 3 * per_image.mean()


def test_a_file_name_that_is_not_utf8_trains_like_any_other(colour_dataset, artifacts):
    source = colour_dataset / "train" / "red" / "000.png"
    with open(os.fsencode(source.parent) + b"/r\xf6t.png", "wb") as handle:  # Latin-1 "röt"
        handle.write(source.read_bytes())
    assert ingest(str(colour_dataset), artifacts, **quiet).train_count == 37


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda root: [shutil.rmtree(root / s / c) for s in ("train", "test") for c in ("blue", "green")],
         "a classifier needs at least 2 class folders, found only 'red'"),
        (lambda root: [p.unlink() for p in (root / "test" / "green").iterdir()], "no images for class(es) green"),
        (lambda root: shutil.rmtree(root / "test" / "blue"), "test: no images for class(es) blue"),
    ],
)  # fmt: skip
def test_data_that_cannot_give_a_meaningful_accuracy_is_refused(colour_dataset, artifacts, damage, words):
    damage(colour_dataset)
    with pytest.raises(DatasetError, match=re.escape(words)):
        ingest(str(colour_dataset), artifacts, **quiet)
    with pytest.raises(DatasetError, match=re.escape("--max-test-images 2 leaves some of the 3 classes empty")):
        ingest(str(write_colour_dataset(colour_dataset.parent / "fresh")), artifacts, max_test_images=2, **quiet)


def test_a_size_the_run_cannot_afford_is_refused_before_anything_is_decoded(colour_dataset, artifacts):
    from model_lib.checks import check_evaluation_memory
    from model_lib.config import ConfigError

    with pytest.raises(ConfigError, match=r"--image-size 1024: the 100,000 validation and test images take 293.0 GiB"):
        check_evaluation_memory(1024, 100_000)
    check_evaluation_memory(32, 100_000)  # 0.3 GiB: fine anywhere
    seen = []

    def refuse(side: int, train: int, test: int) -> None:
        seen.append((side, train, test))
        raise ConfigError("too big")

    with pytest.raises(ConfigError, match="too big"):
        ingest(str(colour_dataset), artifacts, image_size=64, check_size=refuse, **quiet)
    assert seen == [(64, 36, 12)] and not list(artifacts.glob("datasets/*"))  # nothing decoded, nothing cached
