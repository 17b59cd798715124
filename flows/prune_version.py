"""The `prune-version` flow: a smaller, faster version made from a registered one (model_lib/prune.py), fine-tuned
with the version's own recipe on its own training split, then calibrated, evaluated, gated and registered like any
training run (its manifest's `config.pruned` says where it came from)."""

from __future__ import annotations

from prefect import flow

from flows.surfaces import flow_parameters
from flows.train_cifar import outcome, train_and_register
from model_lib.config import check_count, check_run_limits
from model_lib.export import require_tensorflow_backend
from model_lib.prune import check_criterion, check_share
from model_lib.registry import Registry, check_alias, parse_reference
from model_lib.requests import PRUNE_REQUEST, parameter_names, with_defaults
from model_lib.settings import artifacts_location
from tasks.common import KEPT_RESULTS, check_deployment_storage, finished, in_parameter_words
from tasks.pruning import prune_task


@flow(name="prune-version", **KEPT_RESULTS)
@in_parameter_words(parameter_names(PRUNE_REQUEST))
@flow_parameters(PRUNE_REQUEST)
def prune_version(**request) -> dict:
    """Prune a registered airbench version's convs to a share of their channels, fine-tune and register the result.

    The pruned version goes through the same gate as a training run: it becomes champion only where it earns it.
    """
    request = with_defaults(PRUNE_REQUEST, request)
    check_plan(request)
    version_dir = parse_reference(request["model"], artifacts_location())
    config, dataset = prune_task(
        str(version_dir), request["keep"], request["criterion"], request["epochs"], request["target_speedup"]
    )
    registration = train_and_register(
        config, dataset, request["timeout_minutes"], request["promotion_margin"], request["export"]
    )
    registration["pruned_from"] = config["pruned"]["from"]
    if request["alias"]:
        Registry(artifacts_location(), registration["name"]).set_alias(
            request["alias"], f"v{registration['version']}", f"prune --alias: pruned from {config['pruned']['from']}"
        )
        registration["alias"] = request["alias"]
    return finished(outcome(registration), registration)


def check_plan(request: dict) -> None:
    """Every option of a pruning request, before any work (the CLI calls it before Prefect starts).

    Raises:
        ConfigError: A bad option.
    """
    check_deployment_storage()
    check_share(request["keep"], request["target_speedup"])
    check_criterion(request["criterion"])
    if request["epochs"] is not None:
        check_count("epochs", request["epochs"])
    if request["alias"] is not None:
        check_alias(request["alias"])
    check_run_limits(request["timeout_minutes"], request["promotion_margin"])
    if request["export"]:
        require_tensorflow_backend()  # before training, not after
