"""Structured pruning (model_lib/prune.py) and the prune-version flow (flows/prune_version.py)."""

import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from model_lib.config import ConfigError
from model_lib.fileio import read_json
from model_lib.models import build_model, with_tta
from model_lib.prune import (
    channel_scores,
    channel_spaces,
    family_points,
    flops,
    kept_channels,
    kept_count,
    pruned_weights,
    search_keep,
    timed_shares,
    widths,
)
from model_lib.versions import ChecksumError, verify_version


def test_a_pruned_network_is_its_parent_without_the_channels_nothing_reads():
    """Channels whose readers' weights are zero contribute nothing: both criteria rank them last, and the smaller
    network built from the rest gives the parent's probabilities. Fails when any layer is sliced on the wrong axis."""
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    parent = build_model("airbench", 10, 32, calibration_images=images, width=0.25)
    for layer in parent.layers:  # batch norms with offsets and statistics of their own, not the identity
        if type(layer).__name__ == "BatchNormalization":
            beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.normal(0, 0.5, beta.shape), rng.normal(0, 0.5, mean.shape),
                               rng.uniform(0.5, 2, variance.shape)])  # fmt: skip
    spaces = channel_spaces(parent)
    assert widths(parent, spaces) == [16, 16, 64, 64, 64, 64]  # two convs a group, at quarter width
    for space in spaces:  # every second channel of each conv is read by nothing
        reader = parent.layers[space.reader]
        kernel, *rest = reader.get_weights()
        kernel[..., 1::2, :] = 0
        reader.set_weights([kernel, *rest])
    for criterion, sample in (("weight", None), ("activation", images)):
        kept = kept_channels(channel_scores(parent, spaces, criterion, sample), 0.5)
        assert all((keep == np.arange(0, 2 * len(keep), 2)).all() for keep in kept), criterion

    child = build_model("airbench", 10, 32, channels=tuple(widths(parent, spaces, kept)))
    child.set_weights(pruned_weights(parent, spaces, kept))
    pixels = rng.integers(0, 256, (8, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(child(pixels)), np.asarray(parent(pixels)), atol=1e-5)
    assert widths(child, channel_spaces(child)) == [8, 8, 32, 32, 32, 32]
    assert flops(child) < flops(parent) / 2.5 and child.count_params() < parent.count_params() / 3


def test_the_pruning_plot_puts_the_parent_and_each_pruned_version_on_one_curve(tmp_path):
    from PIL import Image

    from model_lib.plots import plot_pruning

    parent = {"version": 1, "metrics": {"test_accuracy": 0.906}}
    family = [{"label": f"v{v} (keep {keep:g})", "keep": keep, "accuracy": accuracy,
               "measured": {"speedup": speedup, "bytes": size, "parent_bytes": 4_000_000}}
              for v, keep, accuracy, speedup, size in ((2, 0.5, 0.892, 2.5, 1_100_000),
                                                       (3, 0.75, 0.904, 1.5, 2_300_000))]  # fmt: skip
    points = family_points(parent, family)
    assert [(p["label"], p["keep"], p["speedup"], p["megabytes"]) for p in points] == [
        ("parent v1", 1.0, 1.0, 4.0),
        ("v2 (keep 0.5)", 0.5, 2.5, 1.1),
        ("v3 (keep 0.75)", 0.75, 1.5, 2.3),
    ]
    path = Path(plot_pruning(points, "v3 (keep 0.75)", tmp_path / "pruning.png"))
    assert Image.open(path).size[0] > 600


def test_a_share_keeps_the_nearest_multiple_of_eight_channels_and_never_fewer():
    assert [kept_count(128, keep) for keep in (0.5, 0.55, 0.25, 0.95)] == [64, 72, 32, 120]
    assert [kept_count(32, keep) for keep in (0.55, 0.1)] == [16, 8]  # 17.6 -> 16; 3.2 -> at least 8
    assert kept_count(12, 0.9) == 8 and kept_count(6, 0.5) == 6  # never more than the conv has


def test_a_target_speedup_keeps_the_largest_share_that_reaches_it_or_says_none_does():
    asked = []

    def speedup(keep: float) -> float:  # fewer channels, faster: 0.6 gives 2.15x, 0.65 gives 1.91x
        asked.append(keep)
        return keep**-1.5

    assert search_keep(speedup, 2.0, log=lambda line: None) == 0.6
    assert len(asked) <= 6  # bisection over the 18 shares, not each of them
    with pytest.raises(ConfigError, match=r"^--target-speedup 12: even keeping 0.1 of the channels runs only 10.00x"):
        search_keep(lambda keep: 1 / keep, 12.0, log=lambda line: None)
    # The measure itself: a real network of each share, timed beside the version's (no figure asserted: bench/).
    network = build_model("airbench", 10, 32, width=0.25)
    said = []
    measured = timed_shares(network, channel_spaces(network), 10, np.zeros((64, 32, 32, 3), np.uint8), said.append)
    assert measured(0.5) > 0 and said[-1].startswith("Keep 0.5: ")
    with_views = timed_shares(network, channel_spaces(network), 10, np.zeros((64, 32, 32, 3), np.uint8), said.append,
                              partial(with_tta, translate=True))  # fmt: skip
    assert with_views(0.5) > 0 and "(Keras, with its views, before fine-tuning)" in said[-1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--keep", "0"], "--keep is the fraction of channels kept, above 0 and below 1, not 0.0"),
        (["--keep", "1.5"], "--keep is the fraction of channels kept, above 0 and below 1, not 1.5"),
        (["--criterion", "norm"], "--criterion 'norm': choose from activation, weight"),
        (["--target-speedup", "1"], "--target-speedup is a speed-up above 1 and at most 20, not 1.0"),
        (["--keep", "0.5", "--target-speedup", "2"], "--keep and --target-speedup: give one, not both"),
        (["--alias", "champion"], "--alias 'champion': an alias is a lower-case name such as edge"),
        (["--epochs", "0"], "--epochs"),
    ],
)
def test_a_bad_pruning_option_is_one_line_before_any_work(options, message, artifacts):
    from flows.cli import app

    result = CliRunner().invoke(app, ["prune", "cifar10", *options])
    assert isinstance(result.exception, ConfigError) and str(result.exception).startswith(message)  # main(): exit 2
    worded = CliRunner().invoke(app, ["prune", "cifar10", "--keep", "half"])
    assert worded.exit_code == 2 and "Invalid value for '--keep'" in worded.output
    assert not (artifacts / "models").exists()


@pytest.mark.slow
@pytest.mark.real_data
def test_prune_registers_a_smaller_version_through_the_gate_that_exports_and_serves(
    prefect_harness, tiny_on_real_cifar, cifar_dir, artifacts, tmp_path
):
    """Trains (one epoch of fine-tuning at tiny's size): only a real run shows the whole path, from the parent's
    training split to a registered, exported, served version with its lineage."""
    from flows.batch_predict import batch_predict
    from flows.prune_version import prune_version

    source, trained = tiny_on_real_cifar
    shutil.copytree(source, artifacts, dirs_exist_ok=True)
    parent_dir = artifacts / Path(trained["path"]).relative_to(source)
    parent = read_json(parent_dir / "manifest.json")
    result = prune_version(model=f"{trained['name']}@v{trained['version']}", keep=0.5, epochs=1, export=True,
                           alias="edge")  # fmt: skip
    assert result["version"] == trained["version"] + 1 and result["pruned_from"] == f"cifar10 v{trained['version']}"
    version_dir = Path(result["path"])
    manifest = read_json(version_dir / "manifest.json")
    lineage = manifest["config"]["pruned"]
    assert lineage["from"] == result["pruned_from"] and lineage["criterion"] == "activation" and lineage["keep"] == 0.5
    assert lineage["channels"] == [round(c / 2) for c in lineage["channels_before"]]
    assert lineage["flops"] < lineage["flops_before"] / 2.5 and lineage["parameters"] == manifest["parameter_count"]
    assert manifest["parameter_count"] < parent["parameter_count"] / 3
    assert manifest["dataset"]["test_fingerprint"] == parent["dataset"]["test_fingerprint"]  # the same test images
    assert manifest["config"]["epochs"] == 1 and verify_version(version_dir) == []
    # Timed beside its parent on the same test images, and plotted with it in report.md (both checksummed).
    measured = read_json(version_dir / "pruning.json")
    assert measured["images"] == manifest["dataset"]["test_count"] and measured["engine"] == "keras (tensorflow)"
    assert measured["speedup"] == pytest.approx(measured["images_per_second"] / measured["parent_images_per_second"],
                                                rel=1e-2)  # fmt: skip
    assert measured["bytes"] < measured["parent_bytes"] / 2
    assert {"pruning.json", "pruning.png"} <= set(manifest["files"])
    assert "](pruning.png)" in (version_dir / "report.md").read_text()
    # The same gate as any run: champion only with the parent's accuracy or more (the margin is 0).
    assert result["champion"] is (result["test_accuracy"] >= parent["metrics"]["test_accuracy"])
    assert {entry["format"] for entry in result["exports"]} == {"float32", "float16", "int8"}
    from flows.cli import app

    listed = CliRunner().invoke(app, ["models", "list"]).output.splitlines()[-1].split()
    assert listed[0] == f"v{result['version']}" and "edge" in listed[1].split(",")
    assert " ".join(listed[-4:]) == "pruned from cifar10 v1"
    parent_ref, pruned_ref = f"cifar10@v{trained['version']}", f"cifar10@v{result['version']}"
    compared = CliRunner().invoke(app, ["models", "compare", parent_ref, pruned_ref]).output
    assert "Keras images/s (together)" in compared and "keep 0.5: channels 8/8/32" in compared, compared

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((cifar_dir / "test" / "cat").iterdir())[:8]:
        shutil.copyfile(path, photos / path.name)
    done = batch_predict(str(photos), output_csv=str(tmp_path / "p.csv"), model="cifar10@edge")
    table = pd.read_csv(done["output_csv"])
    assert done["error"] == 0 and table["model"].str.contains(f"cifar10 v{result['version']}").all()

    # A target speed-up no share reaches here (the narrowest, 8 channels a conv, runs a few times as fast): one line
    # from the flow, after timing the narrowest share beside the version, and nothing registered.
    with pytest.raises(ConfigError, match=r"target.speedup 19: even keeping 0.1 of the channels runs only \d"):
        prune_version(model=f"cifar10@v{trained['version']}", target_speedup=19, epochs=1)
    assert verify_version(version_dir) == [] and not (version_dir.parent / f"v{result['version'] + 1}").exists()

    (parent_dir / "probe.npz").write_bytes(b"tampered")  # a parent whose files fail their checksums is refused
    with pytest.raises(ChecksumError, match="probe.npz"):
        prune_version(model=str(parent_dir), keep=0.5, epochs=1)
