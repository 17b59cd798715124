"""Alerts: Prefect automations that notify someone when a deployment's run fails or crashes, and when
no retrain has completed within its schedule's period (a stopped worker, a paused schedule, a run
stuck in a queue). `prefect deploy --all` sets them up through the build step in `prefect.yaml`.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta
from urllib.parse import urlsplit

from model_lib.config import ConfigError

WEBHOOK_ENV = "CIFAR_PIPELINE_ALERT_WEBHOOK"  # a URL: the project makes and keeps the block itself
BLOCK_ENV = "CIFAR_PIPELINE_ALERT_BLOCK"  # or a notification block you saved (slack-webhook/team, ...)
WEBHOOK_BLOCK = "cifar-pipeline-alerts"
FAILED = "cifar-pipeline: a run failed"
OVERDUE = "cifar-pipeline: no retrain completed"
OVERDUE_GRACE = timedelta(days=1)  # on top of the schedule's period: the run's own time, a late worker
FLOWS = ("train-cifar", "batch-predict")
RETRAIN_FLOW = "train-cifar"
# Slack's, Mattermost's and Teams' incoming webhooks read `text`; a receiver of your own reads the others.
WEBHOOK_JSON = {"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"}


def install_alerts_step(schedule: dict | None = None) -> dict:
    """`prefect deploy`'s build step: set up (or update) the alerts when WEBHOOK_ENV or BLOCK_ENV is set.

    Args:
        schedule: The retrain's schedule as `prefect.yaml` declares it (`cron`, `timezone`); the
            overdue alert fires when no retrain completed within its period plus OVERDUE_GRACE.
    """
    webhook, block = os.environ.get(WEBHOOK_ENV, ""), os.environ.get(BLOCK_ENV, "")
    if not (webhook or block):
        print(f"alerts: not set up (set {WEBHOOK_ENV} or {BLOCK_ENV} before `prefect deploy` for them)")
        return {"alerts": []}
    period = schedule_period(schedule["cron"], schedule.get("timezone")) if schedule else None
    try:
        names = install_alerts(
            webhook=webhook or None, block=block or None, overdue_after=period and period + OVERDUE_GRACE
        )
    except ConfigError as error:
        # One line, and `prefect deploy` stops: as an exception it would be buried in Prefect's 45-line report.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"alerts: {', '.join(names)}")
    return {"alerts": names}


def schedule_period(cron: str, timezone: str | None = None) -> timedelta:
    """The time between a cron schedule's next two runs (a week for `0 3 * * 0`)."""
    from prefect.server.schemas.schedules import CronSchedule

    first, second = asyncio.run(CronSchedule(cron=cron, timezone=timezone or "UTC").get_dates(n=2))
    return timedelta(seconds=(second - first).total_seconds())  # a plain timedelta, not pendulum's


def install_alerts(
    webhook: str | None = None, block: str | None = None, overdue_after: timedelta | None = None
) -> list:
    """Create or update the automations on the server in PREFECT_API_URL; returns their names.

    Args:
        webhook: A URL to POST each alert to as JSON (saved as the Custom Webhook block WEBHOOK_BLOCK).
        block: Or the slug of a notification block already saved (`slack-webhook/team-alerts`).
        overdue_after: Also alert when no retrain completed for this long; None leaves that alert out.

    Raises:
        ConfigError: The block does not exist or is not a notification block.
    """
    from prefect.client.orchestration import get_client

    block_id = notification_block(webhook, block)
    automations = [failed_run_alert(block_id)]
    if overdue_after:
        automations.append(overdue_retrain_alert(block_id, overdue_after))
    with get_client(sync_client=True) as client:
        for automation in automations:
            existing = client.read_automations_by_name(automation.name)
            if existing:
                client.update_automation(existing[0].id, automation)
                for duplicate in existing[1:]:
                    client.delete_automation(duplicate.id)
            else:
                client.create_automation(automation)
    return [automation.name for automation in automations]


def check_webhook(url: str) -> None:
    """Refuse a webhook no alert could ever be delivered to (`http://`, `http://[::1`, a space in the host).

    Raises:
        ConfigError: Naming the variable, the URL and what is wrong with it.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parsing the port is the check)
    except ValueError as error:
        raise ConfigError(f"{WEBHOOK_ENV} {url!r}: not a URL ({error})") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{WEBHOOK_ENV} {url!r}: not an http(s) URL")
    if not parts.hostname or any(char.isspace() or char in '<>"{}|\\^`' for char in parts.netloc):
        raise ConfigError(f"{WEBHOOK_ENV} {url!r}: no valid host name in it")


def notification_block(webhook: str | None, block: str | None):
    """The id of the block alerts are sent through."""
    from prefect.blocks.abstract import NotificationBlock
    from prefect.blocks.core import Block
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    if webhook:
        check_webhook(webhook)
        return CustomWebhookNotificationBlock(name=WEBHOOK_BLOCK, url=webhook, json_data=WEBHOOK_JSON).save(
            WEBHOOK_BLOCK, overwrite=True
        )
    try:
        loaded = Block.load(block)
    except (ValueError, KeyError) as error:
        raise ConfigError(
            f"{BLOCK_ENV} {block!r}: no such block (save it first, see docs/service.md): {error}"
        ) from None
    if not isinstance(loaded, NotificationBlock):
        raise ConfigError(f"{BLOCK_ENV} {block!r}: a {type(loaded).__name__}, not a notification block")
    return loaded._block_document_id


def _flow_runs_of(flows: tuple[str, ...]) -> dict:
    """A trigger's filter: flow runs of these flows that a deployment started (not a CLI's own runs)."""
    return {
        "match": {"prefect.resource.id": "prefect.flow-run.*"},
        "match_related": [
            {"prefect.resource.role": "flow", "prefect.resource.name": list(flows)},
            {"prefect.resource.role": "deployment"},
        ],
    }


def failed_run_alert(block_id):
    """One notification per failed or crashed run of either deployment, naming it and the error."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=FAILED,
        description="A run of train-cifar or batch-predict from a deployment failed or crashed.",
        trigger=EventTrigger(
            **_flow_runs_of(FLOWS),
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject="cifar-pipeline: {{ flow.name }}/{{ deployment.name }} {{ flow_run.state.name }}",
                body=(
                    "Run {{ flow_run.name }} of {{ flow.name }}/{{ deployment.name }} ended "
                    "{{ flow_run.state.name }}: {{ flow_run.state.message }}\n{{ flow_run|ui_url }}"
                ),
            )
        ],
    )


def overdue_retrain_alert(block_id, overdue_after: timedelta):
    """A notification when no retrain from a deployment completed within `overdue_after`."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    days = overdue_after / timedelta(days=1)
    return AutomationCore(
        name=OVERDUE,
        description=f"No {RETRAIN_FLOW} run from a deployment completed in {days:g} days.",
        trigger=EventTrigger(
            **_flow_runs_of((RETRAIN_FLOW,)),
            expect={"prefect.flow-run.Completed"},
            posture=Posture.Proactive,
            threshold=1,
            within=overdue_after,
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject=f"cifar-pipeline: no {RETRAIN_FLOW} run completed in {days:g} days",
                body=(
                    f"No {RETRAIN_FLOW} run from a deployment has completed in the last {days:g} days: "
                    "is a worker running on its pool, and is the schedule active?"
                ),
            )
        ],
    )
