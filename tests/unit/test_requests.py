"""The training and prediction requests (model_lib/requests.py): each field declared once, and the CLI's
options, the flows' parameters and the deployments' forms made from them (flows/surfaces.py)."""

import json
import re
import subprocess
import sys

import pytest

from model_lib import requests
from model_lib.config import ConfigError, TrainConfig
from tests.conftest import REPO

# A field added to each request, and nothing else edited: it must reach the command's --help, the flow's
# signature and the parameter schema `prefect deploy` sends (Prefect's own `parameter_schema`).
ADDED_FIELDS = """
import inspect, json
from model_lib import requests
from model_lib.requests import Field

requests.TRAIN_REQUEST += (Field("throwaway_knob", int, "A knob for this test only.", default=7),)
requests.PREDICT_REQUEST += (Field("throwaway_dial", float, "A dial for this test only."),)

from prefect.utilities.callables import parameter_schema
from typer.testing import CliRunner

from flows.batch_predict import batch_predict
from flows.cli import app
from flows.train_cifar import train_cifar

seen = {}
for command, flow, name in (("train", train_cifar, "throwaway_knob"), ("predict", batch_predict, "throwaway_dial")):
    shown = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"}).output
    seen[command] = {
        "help": " ".join(shown.split()),
        "parameters": list(inspect.signature(flow.fn).parameters),
        "form": parameter_schema(flow).model_dump()["properties"].get(name),
    }
print(json.dumps(seen))
"""


def test_a_field_added_to_each_request_shows_in_the_cli_the_flow_and_the_deployment_form():
    done = subprocess.run([sys.executable, "-c", ADDED_FIELDS], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    train, predict = seen["train"], seen["predict"]
    assert "--throwaway-knob" in train["help"] and "A knob for this test only. [default: 7]" in train["help"]
    assert train["parameters"][-1] == "throwaway_knob"
    assert train["form"]["description"] == "A knob for this test only." and train["form"]["default"] == 7
    assert "--throwaway-dial" in predict["help"] and "A dial for this test only." in predict["help"]
    assert predict["parameters"][-1] == "throwaway_dial"
    assert predict["form"]["anyOf"] == [{"type": "number"}, {"type": "null"}]


def test_every_flow_parameter_has_its_help_and_its_choices_in_the_form():
    from prefect.utilities.callables import parameter_schema

    from flows.batch_predict import batch_predict
    from flows.train_cifar import train_cifar

    for flow, request in ((train_cifar, requests.TRAIN_REQUEST), (batch_predict, requests.PREDICT_REQUEST)):
        form = parameter_schema(flow).model_dump()["properties"]
        shown = requests.fields_of(request, requests.FLOW)
        assert list(form) == [field.name for field in shown]
        for field in shown:
            assert " ".join(form[field.name]["description"].split()) == field.help, field.name
            if field.choices:
                enum = form[field.name].get("enum") or form[field.name]["anyOf"][0]["enum"]
                assert tuple(enum) == field.choices, field.name


def test_an_unknown_training_option_is_refused_never_dropped():
    from flows.train_cifar import train_cifar

    with pytest.raises(ConfigError, match=r"^unknown training option\(s\): epoch$"):
        requests.training_overrides({"epoch": 3})
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        train_cifar.fn(epoch=3)  # as Prefect calls it, once its own check has let the name through
    assert requests.training_overrides({"epochs": 3, "export": True, "profile": "tiny"}) == {"epochs": 3}


def test_a_config_field_that_trainconfig_lacks_fails_at_import(monkeypatch):
    typo = requests.Field("epoch", int, "A typo of epochs.", config=True)
    monkeypatch.setattr(requests, "TRAIN_REQUEST", (*requests.TRAIN_REQUEST, typo))
    with pytest.raises(TypeError, match="'epoch': config=True is wrong"):
        requests._check_declarations()


def test_the_data_gates_table_gives_the_requests_defaults():
    table = (REPO / "docs" / "registry.md").read_text()
    rows = re.findall(r"^\| `--([a-z-]+)` \| ([^|]+) \|", table, re.M)
    assert {name for name, _ in rows} == {"max-leakage", "min-class-images", "allow-class-change",
                                          "balance-shift-warning"}  # fmt: skip
    for name, shown in rows:
        default = getattr(TrainConfig, name.replace("-", "_"))
        assert shown.strip() == ("off" if default is False else str(default)), name
