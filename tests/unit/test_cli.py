"""The cifar-pipeline CLI: models subcommands on a real registry, train option plumbing."""

import json

from typer.testing import CliRunner

from flows.cli import app
from model_lib.registry import Registry
from tests.unit.test_registry import make_model_files, manifest

runner = CliRunner()


def test_models_commands(artifacts, tmp_path):
    files = make_model_files(tmp_path / "run")
    registry = Registry(artifacts)
    registry.register(files, manifest(0.5))
    registry.register(files, manifest(0.7))

    listing = runner.invoke(app, ["models", "list"])
    assert listing.exit_code == 0
    rows = [line.split() for line in listing.output.splitlines()[1:]]
    assert rows[0][:2] == ["v1", "0.5000"]  # no alias marks on v1
    assert rows[1][0] == "v2" and "latest,champion" in rows[1][1] and rows[1][2] == "0.7000"

    shown = runner.invoke(app, ["models", "show", "cifar10@v1"])
    assert shown.exit_code == 0 and json.loads(shown.output)["version"] == 1

    assert runner.invoke(app, ["models", "verify", "cifar10@latest"]).exit_code == 0
    rolled = runner.invoke(app, ["models", "rollback", "--reason", "bad canary"])
    assert rolled.exit_code == 0 and "-> v1" in rolled.output
    assert runner.invoke(app, ["models", "promote", "cifar10@v2"]).exit_code == 0
    assert registry.state()["aliases"]["champion"] == 2

    (artifacts / "models" / "cifar10" / "v2" / "probe.npz").write_bytes(b"tampered")
    failed = runner.invoke(app, ["models", "verify", "cifar10@v2"])
    assert failed.exit_code == 1 and "probe.npz: checksum differs" in failed.output

    missing = runner.invoke(app, ["models", "show", "cifar10@v7"])
    assert missing.exit_code == 1 and "no such version" in missing.output


def test_train_command_passes_every_option_to_the_flow(prefect_harness, colour_dataset, artifacts):
    result = runner.invoke(
        app,
        ["train", "--profile", "smoke", "--architecture", "seed_cnn", "--epochs", "1", "--batch-size", "8",
         "--data", str(colour_dataset), "--seed", "3", "--learning-rate", "0.001", "--precision", "float32",
         "--validation-split", "0.25", "--name", "colours"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "colours v1 (champion)" in result.output
    config = json.loads((artifacts / "models" / "colours" / "v1" / "config.json").read_text())
    assert (config["architecture"], config["epochs"], config["batch_size"], config["seed"]) == ("seed_cnn", 1, 8, 3)
    assert (config["precision"], config["learning_rate"], config["validation_split"]) == ("float32", 0.001, 0.25)
