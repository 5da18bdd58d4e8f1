"""Where a stage's units of work run: `local` (a process pool on this machine) or `ray` (Ray Core
tasks on a cluster). Plain Python, no Prefect.

A unit is a module-level function applied to one picklable item (a crawl file at ingest, a shard
at clean, a band at dedup); `Executor.map` yields the results in the order of the items, so
what a stage makes never depends on where or in which order its units ran. A failed unit
raises its own exception (never logged and skipped); on Ray, a unit whose node died is run
again elsewhere (Ray's task retries), so a stage completes on the nodes that are left. A unit
is done only when its output file is committed; a stage that is run again skips those, so it
resumes with any number of workers or nodes.

A local pool costs ~0.4 s to start (its forkserver imports the units' module first): dedup's
executor runs units in the calling process meanwhile, and starts no pool for work shorter than
that (`LocalExecutor(caller_helps=True)`).

The executor is a runtime setting (`executor`, `ray_address`, `workers` of a stage's config):
it is not part of any fingerprint, so the same artifact is built, and cached, wherever it ran.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field

from storage import ArtifactStore, ConfigError, StageConfig, add_written, take_written

log = logging.getLogger("kiln")

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class ParallelStageConfig(StageConfig):
    """The settings of a stage whose units run in parallel: how many at a time, and where."""

    runtime_fields: ClassVar[frozenset[str]] = frozenset({"workers", "executor", "ray_address"})

    workers: int = Field(default_factory=default_workers, ge=1,
                         description="Units at a time: worker processes (local), or the most units in flight (ray).")
    executor: Literal["local", "ray"] = Field(
        "local", description="local: a process pool on this machine; ray: Ray Core tasks on a cluster.")
    ray_address: str | None = Field(
        None, description="The Ray cluster to use (ray): its address, else $RAY_ADDRESS, else a local Ray.")


class Executor:
    """Runs units; remembers which nodes ran them (for the manifest's stats)."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.nodes: set[str] = set()

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[R, str]]:
        """(result, the node that ran it) for each item, in the items' order."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {"executor": self.name, "nodes": len(self.nodes)}

    def close(self) -> None:
        """Let go of the workers (a stage uses one executor for all its phases, then closes it)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _this_node() -> str:
    return socket.gethostname()


def _in_a_worker(fn: Callable[[Any], Any], item: Any) -> tuple[Any, dict]:
    """A unit in a worker process: its result, and the sizes and hashes of the files it wrote
    (so the commit need not read them again)."""
    take_written()
    result = fn(item)
    return result, take_written()


def _take_environment(environment: dict[str, str]) -> None:
    """A pool worker's start: the caller's environment as it is now. The forkserver that forks the
    workers keeps the environment of the first pool of this process, so a credential or an S3
    endpoint set since would be missing; fsspec reads its settings from the environment once."""
    os.environ.clear()
    os.environ.update(environment)
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)


def _started() -> None:
    """The first unit a helped pool runs: its workers are up."""


class _PoolStart:
    """A pool starting on a thread of its own; `ready` once it has run a unit (or failed)."""

    def __init__(self, make: Callable[[], ProcessPoolExecutor]):
        self.ready = threading.Event()
        self.pool: ProcessPoolExecutor | None = None
        self.error: BaseException | None = None
        threading.Thread(target=self._start, args=(make,), name="kiln-pool-start", daemon=True).start()

    def _start(self, make) -> None:
        try:
            pool = make()
            pool.submit(_started).result()
            self.pool = pool
        except BaseException as err:  # noqa: BLE001 - handed to the calling thread
            self.error = err
        finally:
            self.ready.set()


class LocalExecutor(Executor):
    """A pool of worker processes on this machine, kept for every `map` until `close` (a stage's
    phases, dedup's four, pay for starting workers once). Forkserver: the caller may be a Prefect
    worker with threads running, and forking a threaded process can deadlock.

    `caller_helps=True`, for a stage whose first phase is where its time goes (dedup: the
    signatures): the calling process runs that phase's first unit itself, and the pool is
    started (on a thread of its own) only if the units left would keep the caller busy for
    longer than starting it takes (`START_SECONDS`: the forkserver first imports the unit's
    module, numpy and pyarrow for dedup); until the workers are up the caller goes on running
    units, then the workers take the rest. Without a pool after the first phase, the later ones
    run in the caller too: a small corpus is done before processes would be up."""

    name = "local"
    START_SECONDS = 0.5

    def __init__(self, workers: int, caller_helps: bool = False):
        super().__init__()
        self.workers = workers
        self.caller_helps = caller_helps
        self._pool: ProcessPoolExecutor | None = None
        self._start: _PoolStart | None = None
        self._inline = False  # caller_helps: the first phase found a pool not worth starting

    @staticmethod
    def _forkserver(fn: Callable):
        context = multiprocessing.get_context("forkserver")
        # Workers fork from a server that has already imported the unit's module (and pyarrow,
        # trafilatura, ... with it), instead of importing them again in every worker. (The list
        # counts when the server starts: the first pool of this process.)
        context.set_forkserver_preload([fn.__module__])
        return context

    def _workers(self, fn: Callable) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=self._forkserver(fn),
                                             initializer=_take_environment, initargs=(dict(os.environ),))
        return self._pool

    def map(self, fn, items):
        items = list(items)
        node = _this_node()
        if items:
            self.nodes.add(node)
        if self.workers <= 1 or len(items) <= 1 or self._inline:
            for item in items:
                yield fn(item), node
            return
        if self.caller_helps and (self._start is None or not self._start.ready.is_set()):
            yield from self._helped(fn, items, node)
            return
        pool = self._workers(fn)
        try:
            for result, written in pool.map(functools.partial(_in_a_worker, fn), items):
                add_written(written)
                yield result, node
        except GeneratorExit:  # the caller stopped reading (zip): the pool stays for the next map
            raise
        except BaseException:
            self.close(cancel=True)  # fail fast: don't finish the other items first
            raise

    def _helped(self, fn, items, node):
        """`map` while the pool starts: the caller takes items from the front until the workers
        are up, and a thread then hands the rest to them; results in the items' order as ever."""
        outcome: dict[int, tuple[bool, Any]] = {}   # item -> (ok, (result, what it wrote) or the error)
        if self._start is None:
            from multiprocessing import forkserver

            self._forkserver(fn)
            forkserver.ensure_running()  # its imports on another core while this one runs the first unit
            began = time.perf_counter()
            outcome[0] = (True, (fn(items[0]), {}))
            if (time.perf_counter() - began) * (len(items) - 1) < self.START_SECONDS:
                self._inline = True
                yield outcome[0][1][0], node
                for item in items[1:]:  # less work than starting the pool takes: all of it here
                    yield fn(item), node
                return
            self._start = _PoolStart(lambda: self._workers(fn))
        start = self._start
        waiting = deque(i for i in range(len(items)) if i not in outcome)
        changed = threading.Condition()
        futures = []

        def finished(i: int, future) -> None:
            error = future.exception()
            with changed:
                outcome[i] = (error is None, future.result() if error is None else error)
                changed.notify_all()

        def hand_over() -> None:
            start.ready.wait()
            pool = start.pool
            if pool is None:  # it failed to start: the caller raises its error
                return
            with changed:
                rest = list(waiting)
                waiting.clear()
            for i in rest:
                future = pool.submit(functools.partial(_in_a_worker, fn), items[i])
                futures.append(future)
                future.add_done_callback(functools.partial(finished, i))

        threading.Thread(target=hand_over, name="kiln-hand-over", daemon=True).start()
        following = 0  # the next result to yield
        try:
            while following < len(items):
                mine = None
                with changed:
                    if following in outcome:
                        ok, value = outcome.pop(following)
                    elif start.ready.is_set() and start.error is not None:
                        raise start.error
                    elif waiting and not start.ready.is_set():
                        mine = waiting.popleft()
                    else:
                        changed.wait(0.05)
                        continue
                if mine is not None:  # run here: what it writes is recorded in this process
                    value = (fn(items[mine]), {})
                    with changed:
                        outcome[mine] = (True, value)
                    continue
                if not ok:
                    raise value
                result, written = value
                add_written(written)
                yield result, node
                following += 1
        except GeneratorExit:
            raise
        except BaseException:
            with changed:
                waiting.clear()
            for future in futures:
                future.cancel()
            self.close(cancel=True)
            raise

    def close(self, cancel: bool = False) -> None:
        if self._start is not None:
            self._start.ready.wait()  # a pool still starting is shut down once up, not left behind
            self._start = None
        self._inline = False
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None


def _on_a_node(fn: Callable[[Any], Any], item: Any) -> tuple[Any, dict, str]:
    """A unit as a Ray task: its result, what it wrote, and the node that ran it."""
    import ray

    result, written = _in_a_worker(fn, item)
    return result, written, ray.util.get_node_ip_address()


RAY_CONNECT_TIMEOUT_S = 30.0


def check_ray_address(address: str | None, timeout_s: float = 10.0) -> None:
    """Fail in one line when a named Ray cluster's `host:port` takes no TCP connection (the
    commands call it before Prefect starts; `connect_ray` again). `auto`, a missing address and
    one without a port are left to `ray.init`."""
    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}") from None


def connect_ray(address: str | None, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """`ray.init` that fails in one line, within `timeout_s`, when a named cluster cannot be
    reached. Ray itself retries an unreachable GCS for minutes (it rewrites 127.0.0.1 to the
    machine's address and tries again every 40 s), so the address is first tried with a plain TCP
    connection, and `ray.init` then runs on a daemon thread with a deadline: the calling thread
    stays responsive (SIGTERM, Ctrl-C) and a server that accepts but never answers as Ray does
    is reported too. With no address Ray starts a local cluster, unbounded."""
    import ray

    def init() -> None:
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)

    if address is None:
        init()
        return

    def unreachable(reason: object) -> ConfigError:
        return ConfigError(f"cannot reach the Ray cluster at {address}: {reason}")

    check_ray_address(address, min(10.0, timeout_s))
    failure: list[BaseException] = []
    done = threading.Event()

    def attempt() -> None:
        try:
            init()
        except BaseException as err:  # noqa: BLE001 - handed to the calling thread
            failure.append(err)
        finally:
            done.set()

    threading.Thread(target=attempt, name="kiln-ray-connect", daemon=True).start()
    if not done.wait(timeout_s):
        raise unreachable(f"no answer in {timeout_s:.0f} s")
    if failure:
        raise unreachable(str(failure[0]).strip().splitlines()[0] if str(failure[0]).strip() else
                          type(failure[0]).__name__) from None


class RayExecutor(Executor):
    """Ray Core tasks: one per unit, at most `in_flight` submitted at a time."""

    name = "ray"

    def __init__(self, address: str | None, in_flight: int):
        super().__init__()
        import ray

        if not ray.is_initialized():
            connect_ray(address or os.environ.get("RAY_ADDRESS") or None)
        self.ray = ray
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.in_flight = max(in_flight, 2 * cpus)
        # retried when its worker or node dies, not when it raises
        # SPREAD: units read and write the shared store, not node-local data, so spread them
        self.remote = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=False,
                                 scheduling_strategy="SPREAD")(_on_a_node)

    def map(self, fn, items):
        queue = iter(list(items))
        pending: deque = deque(self.remote.remote(fn, item) for _, item in zip(range(self.in_flight), queue))
        while pending:
            result, written, node = self._get(pending.popleft())
            add_written(written)
            self.nodes.add(node)
            following = next(queue, None)
            if following is not None:
                pending.append(self.remote.remote(fn, following))
            yield result, node

    def _get(self, ref):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None  # the unit's own error, e.g. one line naming a bad crawl file
            raise

    def nodes_alive(self) -> list[dict]:
        return [n for n in self.ray.nodes() if n.get("Alive")]


def executor_for(config: ParallelStageConfig, store: ArtifactStore | None = None) -> Executor:
    """The executor a stage's config asks for; on Ray, a store every node can reach."""
    if config.executor == "local":
        return LocalExecutor(config.workers)
    executor = RayExecutor(config.ray_address, config.workers)
    if store is not None:
        check_shared(store, executor)
    return executor


def _sees(path: str, token: str) -> bool:
    try:
        with open(path) as handle:
            return handle.read() == token
    except OSError:
        return False


def check_shared(store: ArtifactStore, executor: RayExecutor) -> None:
    """Units write into the store from every node: a local path must be the same directory on
    every node (a shared filesystem). Checked by writing a token here and reading it on each node."""
    if not store.is_local:
        return
    import uuid

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    marker = os.path.join(store.root, f".kiln-shared-{token}")
    os.makedirs(store.root, exist_ok=True)
    with open(marker, "w") as handle:
        handle.write(token)
    try:
        sees = executor.ray.remote(num_cpus=0)(_sees)
        checks = {node["NodeManagerAddress"]: sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id=node["NodeID"], soft=False)).remote(marker, token) for node in executor.nodes_alive()}
        blind = [address for address, ref in checks.items() if not executor.ray.get(ref)]
    finally:
        os.remove(marker)
    if blind:
        raise ConfigError(f"{store.root}: a local directory that node {blind[0]} does not see; with --executor ray "
                          "the data directory must be the same path on every node (a shared filesystem) or an "
                          "s3:// store")
