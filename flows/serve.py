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
    "flows/train_cifar.py:train_cifar": train_cifar,
    "flows/batch_predict.py:batch_predict": batch_predict,
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
