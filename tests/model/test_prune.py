"""Structured pruning (model_lib/prune.py) and the prune-version flow (flows/prune_version.py)."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from model_lib.config import ConfigError
from model_lib.fileio import read_json
from model_lib.models import build_model
from model_lib.prune import channel_scores, channel_spaces, flops, kept_channels, pruned_weights, widths
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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--keep", "0"], "--keep is the fraction of channels kept, above 0 and below 1, not 0.0"),
        (["--keep", "1.5"], "--keep is the fraction of channels kept, above 0 and below 1, not 1.5"),
        (["--criterion", "norm"], "--criterion 'norm': choose from activation, weight"),
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
    # The same gate as any run: champion only with the parent's accuracy or more (the margin is 0).
    assert result["champion"] is (result["test_accuracy"] >= parent["metrics"]["test_accuracy"])
    assert {entry["format"] for entry in result["exports"]} == {"float32", "float16", "int8"}
    from flows.cli import app

    listed = CliRunner().invoke(app, ["models", "list"]).output.splitlines()[-1].split()
    assert listed[0] == f"v{result['version']}" and "edge" in listed[1].split(",")
    assert " ".join(listed[-4:]) == "pruned from cifar10 v1"

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((cifar_dir / "test" / "cat").iterdir())[:8]:
        shutil.copyfile(path, photos / path.name)
    done = batch_predict(str(photos), output_csv=str(tmp_path / "p.csv"), model="cifar10@edge")
    table = pd.read_csv(done["output_csv"])
    assert done["error"] == 0 and table["model"].str.contains(f"cifar10 v{result['version']}").all()

    (parent_dir / "probe.npz").write_bytes(b"tampered")  # a parent whose files fail their checksums is refused
    with pytest.raises(ChecksumError, match="probe.npz"):
        prune_version(model=str(parent_dir), keep=0.5, epochs=1)
