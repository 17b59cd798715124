"""`models compare`: what differs between two versions, and the table a person reads."""

from model_lib.compare import compare_manifests, comparison_text


def manifest(version: int, accuracy: float, f1: dict, epochs: int, test_set: str) -> dict:
    return {
        "name": "cifar10",
        "version": version,
        "config": {"profile": "smoke", "epochs": epochs, "seed": 0},
        "metrics": {"test_accuracy": accuracy, "test_loss": 1.0, "epochs_run": epochs,
                    "per_class": [{"class": name, "f1": value} for name, value in f1.items()]},
        "calibration": {"test_ece_after": 0.02},
        "dataset": {"fingerprint": "d", "test_fingerprint": test_set, "train_count": 10, "test_count": 5},
    }  # fmt: skip


def test_compare_lists_metric_and_per_class_changes_and_only_the_config_that_differs():
    first = manifest(1, 0.50, {"cat": 0.4, "dog": 0.6}, 2, "A")
    second = manifest(2, 0.75, {"cat": 0.7, "dog": 0.5, "eel": 0.9}, 4, "B")
    comparison = compare_manifests(first, second)
    assert comparison["metrics"]["test_accuracy"] == {"first": 0.5, "second": 0.75, "change": 0.25}
    assert comparison["per_class"]["cat"]["change"] == 0.3 and comparison["per_class"]["dog"]["change"] == -0.1
    assert comparison["per_class"]["eel"] == {"first": None, "second": 0.9, "change": None}
    assert comparison["config"] == {"epochs": {"first": 2, "second": 4}} and comparison["same_test_set"] is False
    text = "\n".join(comparison_text(comparison))
    assert "epochs_run" in text and "+2" in text and "different test sets" in text
    assert [line.split() for line in text.splitlines() if line.strip().startswith("cat")] == [
        ["cat", "0.4000", "0.7000", "+0.3000"]
    ]


def test_a_pruned_version_beside_its_parent_shows_its_lineage_size_and_speed_timed_together():
    parent = manifest(1, 0.80, {"cat": 0.6}, 2, "A") | {"parameter_count": 498680}
    child = manifest(2, 0.79, {"cat": 0.6}, 2, "A") | {"parameter_count": 127384}
    child["config"] = {**child["config"], "pruned": {
        "from": "cifar10 v1", "criterion": "activation", "keep": 0.5, "channels_before": [32, 128],
        "channels": [16, 64], "flops_before": 66_132_544, "flops": 20_270_144}}  # fmt: skip
    pruning = {"parent_images_per_second": 2308.0, "images_per_second": 4686.3}
    comparison = compare_manifests(parent, child, pruning)
    assert comparison["size"] == {
        "parameters": {"first": 498680, "second": 127384, "change": -371296},
        "Keras images/s (together)": {"first": 2308, "second": 4686, "change": "2.03x"},
    }
    backwards = compare_manifests(child, parent, pruning)["size"]["Keras images/s (together)"]
    assert (backwards["first"], backwards["change"]) == (4686, "0.49x")  # the pruned one first
    text = "\n".join(comparison_text(comparison))
    assert "from cifar10 v1, activation, keep 0.5: channels 16/64 of 32/128, 20.3 of 66.1 MFLOPs" in text
    assert "2.03x" in text and "{" not in text  # no record printed raw
    assert "Keras images/s" not in "\n".join(comparison_text(compare_manifests(parent, child)))  # not timed
