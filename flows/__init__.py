"""Prefect flows (orchestration only) and the `cifar-pipeline` CLI."""
