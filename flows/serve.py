"""Serve both flows without a work pool, from the deployments declared in `prefect.yaml`."""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron

from flows.batch_predict import batch_predict
from flows.train_cifar import train_cifar

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
FLOWS_BY_ENTRYPOINT = {
    "flows.train_cifar.train_cifar": train_cifar,
    "flows.batch_predict.batch_predict": batch_predict,
}


def deployments_from_yaml(path: Path = PREFECT_YAML) -> list:
    """`RunnerDeployment`s with the names, parameters, schedules, triggers and limits that `prefect.yaml` declares."""
    declared = yaml.safe_load(path.read_text(encoding="utf-8"))["deployments"]
    return [
        FLOWS_BY_ENTRYPOINT[spec["entrypoint"]].to_deployment(
            name=spec["name"],
            description=spec.get("description"),
            tags=spec.get("tags"),
            parameters=spec.get("parameters"),
            concurrency_limit=spec.get("concurrency_limit"),
            schedules=[
                Cron(schedule["cron"], timezone=schedule.get("timezone"), active=schedule.get("active", True))
                for schedule in spec.get("schedules") or []
            ],
            triggers=[DeploymentEventTrigger(**trigger) for trigger in spec.get("triggers") or []],
        )
        for spec in declared
    ]


def refuse_pool_deployments(deployments: list) -> None:
    """Refuse to serve a deployment name that `prefect deploy` gave to a work pool: serving would take it over.

    Raises:
        ConfigError: Naming the deployment, its pool and what to do.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from model_lib.config import ConfigError

    with get_client(sync_client=True) as client:
        for deployment in deployments:
            name = f"{deployment.flow_name}/{deployment.name}"
            try:
                existing = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                raise ConfigError(
                    f"{name} belongs to work pool {existing.work_pool_name} (prefect deploy): serve would take it "
                    f"over; use the pool's worker, or `prefect deployment delete {name}` first"
                )
