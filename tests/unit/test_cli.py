"""The cifar-pipeline CLI: models subcommands on a real registry, train option plumbing."""

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app
from model_lib.config import ConfigError
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

    shown = runner.invoke(app, ["models", "show", "cifar10@v1", "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["version"] == 1
    summary = runner.invoke(app, ["models", "show", "cifar10@v1"])
    assert summary.exit_code == 0 and "cifar10 v1 (tiny" in summary.output and "test accuracy 0.5000" in summary.output
    listed = json.loads(runner.invoke(app, ["models", "list", "--json"]).output)
    assert listed["aliases"] == {"latest": 2, "champion": 2} and [v["version"] for v in listed["versions"]] == [1, 2]

    compared = runner.invoke(app, ["models", "compare", "cifar10@v1", "cifar10@latest"])
    assert compared.exit_code == 0, compared.output
    assert compared.output.split("\n")[1].split() == ["test_accuracy", "0.5000", "0.7000", "+0.2000"]
    as_json = json.loads(runner.invoke(app, ["models", "compare", "cifar10@v1", "cifar10@v2", "--json"]).output)
    assert as_json["versions"] == ["cifar10 v1", "cifar10 v2"] and as_json["same_test_set"] is True
    assert as_json["metrics"]["test_accuracy"]["change"] == 0.2 and as_json["config"] == {}

    assert runner.invoke(app, ["models", "verify", "cifar10@latest"]).exit_code == 0
    rolled = runner.invoke(app, ["models", "rollback", "--reason", "bad canary"])
    assert rolled.exit_code == 0 and "-> v1" in rolled.output
    assert runner.invoke(app, ["models", "promote", "cifar10@v2"]).exit_code == 2  # a reason is required
    empty = runner.invoke(app, ["models", "promote", "cifar10@v2", "--reason", " "])
    assert isinstance(empty.exception, ConfigError) and "--reason must say why" in str(empty.exception)
    assert runner.invoke(app, ["models", "promote", "cifar10@v2", "--reason", "canary passed"]).exit_code == 0
    assert registry.state()["aliases"]["champion"] == 2

    (artifacts / "models" / "cifar10" / "v2" / "probe.npz").write_bytes(b"tampered")
    failed = runner.invoke(app, ["models", "verify", "cifar10@v2"])
    assert failed.exit_code == 1 and "probe.npz: checksum differs" in failed.output

    missing = runner.invoke(app, ["models", "show", "cifar10@v7"])
    assert missing.exit_code == 1 and "no such version" in missing.output

    tampered = runner.invoke(app, ["models", "promote", "cifar10@v2", "--reason", "try"])
    assert tampered.exit_code == 1 and "v2 refused" in tampered.output and "probe.npz" in tampered.output
    unknown = runner.invoke(app, ["models", "promote", "nosuch@v1", "--reason", "try"])
    assert unknown.exit_code == 1 and "nosuch: no such model" in unknown.output
    assert not (artifacts / "models" / "nosuch").exists()


@pytest.mark.slow
def test_train_command_passes_every_option_to_the_flow(prefect_harness, colour_dataset, artifacts):
    result = runner.invoke(
        app,
        ["train", "--profile", "smoke", "--architecture", "seed_cnn", "--epochs", "1", "--batch-size", "8",
         "--data", str(colour_dataset), "--seed", "3", "--learning-rate", "0.001", "--precision", "float32",
         "--validation-split", "0.25", "--name", "colours", "--learned-margin", "-1", "--tta-translate"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "colours v1 (champion)" in result.output
    config = json.loads((artifacts / "models" / "colours" / "v1" / "config.json").read_text())
    assert (config["architecture"], config["epochs"], config["batch_size"], config["seed"]) == ("seed_cnn", 1, 8, 3)
    assert (config["precision"], config["learning_rate"], config["validation_split"]) == ("float32", 0.001, 0.25)
    assert config["learned_margin"] == -1  # one epoch at this rate learns little: the guard is off for this check
    assert config["tta_translate"]
    import keras

    from model_lib.models import tta_views, unwrap_tta

    model = keras.saving.load_model(artifacts / "models" / "colours" / "v1" / "model.keras", safe_mode=True)
    assert unwrap_tta(model)[1] == tta_views(translate=True)


def test_project_errors_print_one_line_without_a_traceback_unless_debug(artifacts):
    import subprocess
    import sys

    registry = artifacts / "models" / "cifar10"
    registry.mkdir(parents=True)
    (registry / "registry.json").write_text('{"versions": [')
    script = [sys.executable, "-c", "from flows.cli import main; main()"]
    for command in (
        ["models", "list"],
        ["models", "show", "cifar10@v1"],
        ["predict", str(artifacts), "--model", "cifar10"],
    ):
        done = subprocess.run(script + command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, (command, done.stderr)
        assert done.stderr.strip().splitlines()[-1].startswith(f"error: {registry / 'registry.json'}: corrupt registry")
        assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, command
    debug = subprocess.run(script + ["--debug", "models", "list"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "RegistryError" in debug.stderr


def test_help_lists_every_choice_from_their_single_declaration():
    from model_lib.config import CHOICES, PROFILES
    from model_lib.models import ARCHITECTURES

    assert set(CHOICES["architecture"]) == set(ARCHITECTURES)
    shown = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"}).output.split())
    for choices in (PROFILES, CHOICES["architecture"], CHOICES["precision"]):
        assert f"One of: {', '.join(choices)}." in shown


def test_the_train_command_and_the_flow_take_the_same_options():
    import dataclasses
    import inspect
    import typing

    from flows.cli import train
    from flows.train_cifar import train_cifar
    from model_lib.config import CHOICES, TrainConfig

    command, flow = inspect.signature(train).parameters, inspect.signature(train_cifar.fn).parameters
    assert set(flow) - set(command) == {"skip_unchanged"}  # the data trigger's; the README says so
    assert set(command) <= set(flow)
    assert {name: command[name].default for name in command} == {name: flow[name].default for name in command}
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    assert set(command) - fields == {"promotion_margin", "export", "timeout_minutes"}  # the rest reach the config
    for field, choices in CHOICES.items():  # the UI's lists and the CLI's check come from one declaration
        if field in flow:
            literal = next(a for a in typing.get_args(flow[field].annotation) if typing.get_origin(a) is typing.Literal)
            assert typing.get_args(literal) == choices, field
    assert {"jit_compile", "network_width", "optimizer", "label_smoothing"} <= set(command)  # docs/training.md's


def test_an_allowed_host_that_is_not_a_bare_name_is_a_usage_error_before_anything_loads():
    import subprocess
    import sys

    command = [sys.executable, "-c", "from flows.cli import main; main()", "app", "--allowed-hosts",
               "ml-box.lan,http://ml-box.lan:8000/"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == (
        "error: --allowed-hosts 'http://ml-box.lan:8000/' is not a host name or address (no scheme, port or path)"
    ), done.stderr


def test_a_truncated_manifest_is_one_line_naming_it_for_verify_and_predict(artifacts, tmp_path):
    import subprocess
    import sys

    Registry(artifacts).register(make_model_files(tmp_path / "run"), manifest(0.5))
    path = artifacts / "models" / "cifar10" / "v1" / "manifest.json"
    path.write_bytes(path.read_bytes()[:100])
    script = [sys.executable, "-c", "from flows.cli import main; main()"]
    for command in (["models", "verify", "cifar10@v1"], ["predict", str(tmp_path), "--model", "cifar10@v1"]):
        done = subprocess.run(script + command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "Traceback" not in done.stderr, (command, done.stderr[-2000:])
        assert done.stderr.strip().splitlines()[-1].startswith(f"error: {path}: not valid JSON ("), done.stderr
