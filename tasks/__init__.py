"""Prefect tasks: thin wrappers that pass small dicts of paths and figures between model_lib calls."""
