"""Prefect flows, deployments and the `kiln` CLI. The only package that imports Prefect."""

import os

# Before Prefect is imported: no telemetry, and our stages' log lines reach the run log.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "kiln")
# A stage's progress lines from its worker threads (the tokenizer trainer's feeder) have no run
# context: they still go to the terminal, without a warning that they could not reach the API.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# Training holds a global concurrency slot under a lease. Leases kept on disk (in PREFECT_HOME)
# outlive the server that granted them: when a run is killed with its temporary server, the next
# server still sees the lease lapse and frees the slot (in memory it would be lost, and the slot
# held forever).
os.environ.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.filesystem")
