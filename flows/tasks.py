"""One Prefect task per stage: cached on the artifact's fingerprint, retried on transient errors.

The task's inputs are small: the stage's pydantic config, the input manifests and the data
root; its result is the output manifest as JSON, never the data. The cache key is the
fingerprint of the artifact the task would build. Before each call the flow checks that
artifact, and the result record cached under the key: when the artifact is missing or fails
verification, or the record is not plain JSON, the call refreshes the cache (runs and records
anew) instead of answering from it, so a deleted artifact is rebuilt, never a stale hit, and no
record is ever unpickled; the first run records its result under the key, so the second run is
a cache hit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.tasks import exponential_backoff

from flows.result_records import SERIALIZER, safe_to_read
from flows.ui_artifacts import publish
from storage import PERMANENT_OS_ERRORS, ArtifactStore, KilnError, Manifest, Stage, StageConfig, StorageError

RETRIES = 3
log = logging.getLogger("kiln")


def _stage(name: str) -> Stage:
    from flows.stages import STAGES

    return STAGES[name].stage


@dataclass
class ArtifactFingerprint(CachePolicy):
    """Prefect cache key = the output artifact's fingerprint (and the store it lives in)."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        stage = _stage(inputs["stage_name"])
        return cache_key(stage, stage.fingerprint(inputs["config"], inputs["inputs"]), inputs["data_dir"])


def cache_key(stage: Stage, fp: str, data_dir: str) -> str:
    root = hashlib.sha256(ArtifactStore(data_dir).url.encode()).hexdigest()[:12]
    return f"kiln-{stage.name}-{fp}-{root}"


def cache_is_usable(stage_name: str, config: StageConfig, inputs: list[Manifest], data_dir: str) -> bool:
    """Whether Prefect may answer the task from its cache: the artifact is committed and intact,
    and the result record under the key is plain JSON (flows/result_records.py)."""
    stage = _stage(stage_name)
    fp = stage.fingerprint(config, inputs)
    return ArtifactStore(data_dir).get(stage_name, fp) is not None and safe_to_read(cache_key(stage, fp, data_dir))


def should_retry(task, task_run, state) -> bool:
    """Retry what may pass (I/O hiccups, a lost worker); never a config or input error."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, KilnError):
        return error.retriable
    if isinstance(error, OSError) and error.errno in PERMANENT_OS_ERRORS:
        return False  # permissions, a full or read-only disk, a path that is not a directory
    return not isinstance(error, (StorageError, ValueError, TypeError, KeyError, AttributeError))


@task(
    cache_policy=ArtifactFingerprint(),
    persist_result=True,
    result_serializer=SERIALIZER,
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=should_retry,
)
def stage_task(stage_name: str, config: StageConfig, inputs: list[Manifest], data_dir: str,
               force: bool = False) -> dict:
    """Build (or find) the stage's artifact; `config` is the stage's own pydantic config."""
    started = time.perf_counter()
    with device_slots(stage_name, config):
        manifest = _stage(stage_name).run(config, inputs, ArtifactStore(data_dir), force=force)
    return {
        "manifest": manifest.model_dump(mode="json"),
        "built": manifest.built,
        "seconds": round(time.perf_counter() - started, 3),
    }


LEASE_SECONDS = 60  # the least the server accepts


@contextlib.contextmanager
def device_slots(stage_name: str, config: StageConfig):
    """Training holds one slot of the global `gpu` limit per GPU it uses (`cpu-training`, one
    slot, on a machine without GPUs), so concurrent runs queue for devices instead of sharing
    them. The limit is created on first use with as many slots as the machine has GPUs. A
    stage trains when its config has a `launch` section."""
    launch = getattr(config, "launch", None)
    if launch is None:
        yield
        return
    import torch
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    gpus = torch.cuda.device_count()
    name, capacity = ("gpu", gpus) if gpus else ("cpu-training", 1)
    wanted = min(capacity, launch.num_processes) if gpus else 1
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=capacity))
        held = contextlib.ExitStack()
        while True:  # wait for the slots, taking back those of killed runs every lease period
            release_lapsed_leases(client)
            try:
                # The holder renews its lease every 3/4 of LEASE_SECONDS while the stage runs.
                held.enter_context(concurrency(name, occupy=wanted, lease_duration=LEASE_SECONDS,
                                               timeout_seconds=LEASE_SECONDS, raise_on_lease_renewal_failure=False))
                break
            except TimeoutError:
                log.info("%s: waiting for a %s slot (another run is training)", stage_name, name)
    with held:
        yield


def release_lapsed_leases(client) -> None:
    """Free the slots of runs killed while holding them (SIGKILL: no release).

    Their leases lapse, but Prefect's temporary server, which `kiln` commands use when no
    server is up, runs no background services, so nothing revokes them and the slot stays
    taken for good. This does what a full server's repossessor does: release every lapsed
    lease in the lease storage (on disk in PREFECT_HOME, see flows/__init__.py)."""
    from prefect.settings import get_current_settings

    index = Path(get_current_settings().home) / "concurrency_leases" / "expirations.json"
    try:
        expirations = json.loads(index.read_text())
    except (OSError, ValueError):
        return
    now = datetime.now(UTC)
    for lease_id, expires in expirations.items():
        if datetime.fromisoformat(expires) < now:
            with contextlib.suppress(Exception):  # revoked meanwhile by the server or another run
                client.release_concurrency_slots_with_lease(lease_id)


def run_stage(stage_name: str, config: StageConfig, inputs: list[Manifest], data_dir: str, force: bool = False) -> dict:
    """Run a stage's task inside a flow; returns {manifest, built, seconds, cached}.

    `cached` is true when no work was done: a Prefect cache hit, or an artifact another run
    had already committed.
    """
    started = time.perf_counter()
    refresh = force or not cache_is_usable(stage_name, config, inputs, data_dir)
    state = stage_task.with_options(name=stage_name, task_run_name=stage_name, refresh_cache=refresh)(
        stage_name, config, inputs, data_dir, force, return_state=True,
    )
    result = state.result()  # raises the stage's own exception when it failed
    cached = state.name == "Cached" or not result["built"]
    run = {**result, "cached": cached, "state": state.name, "seconds": round(time.perf_counter() - started, 3)}
    store = ArtifactStore(data_dir)
    publish(stage_name, run, store.uri(Manifest.model_validate(result["manifest"])))
    return run
