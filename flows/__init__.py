"""Prefect flows, deployments and the `kiln` CLI. The only package that imports Prefect."""

import os

# Before Prefect is imported: no telemetry, and our stages' log lines reach the run log.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "kiln")
