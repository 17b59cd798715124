"""A user's own folders train like CIFAR: digits in every precision and at their own size, other shapes, a guard
for useless runs."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.batch_predict import batch_predict
from flows.train_cifar import train_cifar
from model_lib.data_report import DataGateError
from model_lib.evaluate import NothingLearned, check_learned, majority_rate
from model_lib.fileio import read_json
from model_lib.registry import Registry
from tests.synthetic import write_hues_dataset, write_scattered_digits_dataset, write_uninformative_dataset

# The precisions precision=auto can pick on a CPU (float32; bf16 with AMX or a faster AVX-512 BF16), each at quarter
# width for 8 epochs: 96.9% in bf16 on an AVX-512 BF16 host, and float32 clears 95% there too, in 18 s rather than
# 49 s at full width for 3 epochs (31 s rather than 98 s under JAX). A CPU without bf16 units emulates it (1,264 s at
# full width on an AMD EPYC without AVX-512); its correctness (batch norm's epsilon once left it at chance) and the
# flag rules' show at any width.
CPU_PRECISIONS = {"float32": (8, 0.25), "mixed_bfloat16": (12, 0.25)}  # epochs, network width


@pytest.mark.slow
# Under JAX (its CPU pass takes 2-4x TensorFlow's time) float32 only: the real-data accuracy check.
@pytest.mark.parametrize(
    "precision", [pytest.param(p, marks=pytest.mark.backends) if p == "float32" else p for p in CPU_PRECISIONS]
)
def test_greyscale_digits_train_to_95_percent_in_every_cpu_precision(
    prefect_harness, digits, artifacts, precision, tmp_path
):
    # bf16 once sat at chance here (10.6%) while float32 reached 98.9%: batch norm's epsilon.
    epochs, width = CPU_PRECISIONS[precision]
    result = train_cifar(profile="smoke", data=str(digits), epochs=epochs, network_width=width, precision=precision)
    assert result["test_accuracy"] >= 0.95, result
    assert result["name"] == "digits" and result["champion"]  # named after its folder, not cifar10
    manifest = read_json(Path(result["path"]) / "manifest.json")
    assert manifest["training"]["precision"] == precision
    assert manifest["dataset"]["test_count"] == 360 and len(manifest["dataset"]["class_names"]) == 10
    if precision != "float32":
        return
    # 1,437 images of 8x8 px get both flag rules, decided by the held-out images: noise is flagged, digits rarely.
    calibration, held_out = manifest["calibration"], manifest["dataset"]["validation_count"]
    assert calibration["fitted_on"] == f"validation split ({held_out} images)" and calibration["unsure_threshold"]
    assert f"limit from {held_out} validation images" in calibration["feature_rule"]["fitted_on"]
    noise = tmp_path / "noise"
    noise.mkdir()
    for i, pixels in enumerate(np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8)):
        Image.fromarray(pixels).save(noise / f"{i:02d}.png")
    for folder, low, high in ((noise, 0.95, 1.0), (digits / "test", 0.0, 0.10)):  # 40/40 and 6.4% flagged
        output = tmp_path / f"{folder.name}.csv"
        batch_predict(str(folder), output_csv=str(output), model=result["path"])
        flags = [row["flag"] for row in csv.DictReader(open(output, encoding="utf-8"))]
        assert "" not in flags and low <= sum(flag != "ok" for flag in flags) / len(flags) <= high, folder


# TensorFlow only: under JAX the kernel step itself is checked against airbench94_muon's (test_recipe.py).
@pytest.mark.slow
def test_digits_on_a_large_canvas_train_at_their_own_size_with_the_muon_recipe(prefect_harness, tmp_path, artifacts):
    folder = write_scattered_digits_dataset(tmp_path / "scattered")  # 16-px digits at random places on 128-px noise
    # At three-quarter width (48 s on two cores against about twice that at full width): 94.4%; full width 96.1% in
    # 6 epochs as in 8, half width 93.6%; at 32 px, where a digit is 4 px, 88.9% in 8 (bench/RESULTS.md).
    result = train_cifar(profile="default", data=str(folder), epochs=6, batch_size=64, network_width=0.75)
    assert result["test_accuracy"] >= 0.92, result  # image_size: auto
    manifest = read_json(Path(result["path"]) / "manifest.json")
    config, calibration = manifest["config"], manifest["calibration"]
    assert config["image_size"] == 128 and manifest["input"]["shape"] == [128, 128, 3]
    assert "median short side of 200 sampled training images is 128 px" in manifest["dataset"]["image_size"]["chosen"]
    assert "| image size | 128 px (auto: " in (Path(result["path"]) / "report.md").read_text()
    # 2% of 1,437 images is 29: too few to calibrate on, so the split holds out 5 of each digit.
    assert manifest["dataset"]["validation_count"] == 50 and calibration["fitted_on"] == "validation split (50 images)"
    assert 0 < calibration["unsure_threshold"] < 1  # the prediction CSV's flag column has a rule
    assert config["optimizer"] == "muon" and config["learning_rate"] == pytest.approx(0.828 * 64 / 1000)
    assert config["muon_learning_rate"] == pytest.approx(0.17 * (64 / 1000) ** 0.5)
    # Prediction decodes the files at the model's 128 px, as ingest did: it finds the threes evaluation found.
    summary = batch_predict(str(folder / "test" / "3"), output_csv=str(tmp_path / "threes.csv"), model=result["path"])
    rows = list(csv.DictReader(open(tmp_path / "threes.csv", encoding="utf-8")))
    threes = next(row for row in manifest["metrics"]["per_class"] if row["class"] == "3")
    assert summary["ok"] == len(rows) == threes["support"], summary
    assert abs(sum(row["label"] == "3" for row in rows) - threes["recall"] * len(rows)) <= 1, threes


# TensorFlow only: under JAX, tiny folders and odd last batches are the learned-nothing test's (24 images, batch 8).
@pytest.mark.slow
def test_many_classes_of_few_non_square_images(prefect_harness, tmp_path, artifacts):
    folder = write_hues_dataset(tmp_path / "My Hues!")
    result = train_cifar(
        profile="smoke", data=str(folder), epochs=8, batch_size=12, validation_split=0.2, min_class_images=6
    )  # 6 training images per class, below the gate's default 10
    manifest = read_json(Path(result["path"]) / "manifest.json")
    assert result["name"] == "My-Hues" and len(manifest["dataset"]["class_names"]) == 12
    assert manifest["input"]["shape"] == [32, 32, 3]  # auto: 48x30 images resized to the model's input
    assert result["test_accuracy"] >= 0.8, result
    # Asked at another size, the run still faces the champion: on the same files, decoded at each model's size.
    second = train_cifar(
        profile="smoke", data=str(folder), epochs=8, batch_size=12, validation_split=0.2, min_class_images=6,
        image_size=40, model_name=result["name"],
    )  # fmt: skip
    assert read_json(Path(second["path"]) / "manifest.json")["input"]["shape"] == [40, 40, 3]
    assert "champion v1's" in second["reason"] and "on test set" in second["reason"], second["reason"]


@pytest.mark.backends
@pytest.mark.slow
def test_a_run_that_learned_nothing_is_refused_and_registers_nothing(prefect_harness, tmp_path, artifacts):
    folder = write_uninformative_dataset(tmp_path / "same")
    options = dict(profile="smoke", data=str(folder), epochs=1, batch_size=8, validation_split=0.5)
    # Every test image equals a training image: the data gates stop it before training ...
    with pytest.raises(DataGateError, match=r"test leakage: 24 test image\(s\) \(100\.00%\)"):
        train_cifar(**options)
    # ... and with the gates relaxed, the learned-nothing guard does: on validation, or where 12 validation
    # images beat chance by luck (seen under JAX), on the test split, which holds every training picture.
    refusal = r"(validation|test) accuracy \S+ is not above the majority-class rate 0\.3333 \+ margin 0\.05"
    with pytest.raises(NothingLearned, match=refusal):
        train_cifar(**options, max_leakage=1.0, min_class_images=1)
    assert Registry(artifacts, "same").state()["versions"] == []
    assert not (artifacts / "models" / "same").exists()


def test_the_learned_check_compares_with_the_majority_class():
    labels = [0, 0, 0, 1]
    assert majority_rate(labels) == 0.75
    check_learned("test", 0.81, labels, margin=0.05)
    with pytest.raises(NothingLearned, match="test accuracy 0.8000 is not above the majority-class rate 0.7500"):
        check_learned("test", 0.80, labels, margin=0.05)
