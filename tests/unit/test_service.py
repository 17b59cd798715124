"""The pieces of running as a Prefect service that need no server: messages in a deployment run's words,
time limits from the profile, the watch's retrain parameters, the alerts' overdue period."""

from __future__ import annotations

from datetime import timedelta

import pytest

from flows.alerts import schedule_period
from flows.train_cifar import train_cifar
from flows.watch import retrain_parameters
from model_lib.config import ConfigError, profile_time, resolve_config, training_timeout_minutes


@pytest.mark.parametrize(("in_deployment", "named"), [(False, "--max-train-images"), (True, "max_train_images")])
def test_a_deployment_run_names_the_parameter_where_the_cli_names_the_option(in_deployment, named, monkeypatch):
    if in_deployment:  # what prefect.runtime reads inside a deployment's run
        monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "5b2d5fe4-8b2a-4a4c-9a5e-0d4c1e6b9f10")
    with pytest.raises(ConfigError) as caught:
        train_cifar.fn(profile="smoke", max_train_images=-5)  # refused before any data is read
    message = str(caught.value)
    assert message.startswith(named) and "--" not in message.removeprefix(named if not in_deployment else ""), message


def test_time_limits_follow_the_profile_and_its_epochs():
    assert profile_time("default") == "about 12-35 min" and profile_time("gpu") == "about 1-4 h"
    assert training_timeout_minutes(resolve_config("default")) == 4 * 35
    doubled = resolve_config("default", epochs=2 * resolve_config("default").epochs)
    assert training_timeout_minutes(doubled) == 2 * 4 * 35
    assert training_timeout_minutes(resolve_config("smoke")) == 30  # the floor


def test_watch_params_become_the_retrains_parameters(tmp_path):
    assert retrain_parameters(["profile=fast", "max_train_images=400", "model_name=pets"], tmp_path) == {
        "profile": "fast",
        "max_train_images": 400,
        "model_name": "pets",
    }
    with pytest.raises(ConfigError, match=r"--param 'epoch=3': expected NAME=VALUE with NAME one of profile"):
        retrain_parameters(["epoch=3"], tmp_path)
    with pytest.raises(ConfigError, match="needs --data"):
        retrain_parameters(["profile=fast"], None)
    # typed as the deployment types them, before any event is sent (each retrain would fail on its own)
    with pytest.raises(ConfigError) as refused:
        retrain_parameters(["epochs=abc"], tmp_path)
    assert str(refused.value) == "--param epochs: Input should be a valid integer, unable to parse string as an integer"
    with pytest.raises(ConfigError, match=r"^--param profile: Input should be 'default', 'gpu'"):
        retrain_parameters(["profile=fastest"], tmp_path)


def test_the_overdue_alert_waits_one_schedule_period():
    assert schedule_period("0 3 * * 0", "UTC") == timedelta(days=7)
    assert schedule_period("0 */6 * * *") == timedelta(hours=6)


@pytest.mark.parametrize(
    ("url", "why"),
    [("http://", "no valid host name"), ("http://[::1", "not a URL (Invalid IPv6 URL)"),
     ("https://exa mple.com/x", "no valid host name"), ("not-a-url", "not an http(s) URL"),
     ("http://hooks.example:99999/x", "not a URL (Port out of range")],
)  # fmt: skip
def test_a_webhook_no_alert_could_reach_is_refused_before_anything_is_installed(url, why):
    from flows.alerts import WEBHOOK_ENV, check_webhook

    with pytest.raises(ConfigError) as refused:
        check_webhook(url)
    assert str(refused.value).startswith(f"{WEBHOOK_ENV} {url!r}: {why}")
    check_webhook("https://hooks.slack.com/services/T000/B000/XXXX")  # the guide's example passes


@pytest.mark.slow
def test_a_task_in_a_deployment_run_names_the_parameter_too(prefect_harness, colour_dataset, monkeypatch):
    # The data gates fail in the data-report task, which runs in a thread of its own: the wording follows it there.
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "5b2d5fe4-8b2a-4a4c-9a5e-0d4c1e6b9f10")
    with pytest.raises(Exception, match="too few training images") as caught:
        train_cifar(profile="tiny", data=str(colour_dataset), min_class_images=10_000)
    message = str(caught.value)
    assert "below min_class_images 10000" in message and "--" not in message, message
