"""Start a training script under `accelerate launch`, stream its log, and never leave it orphaned.

Multi-process on CPU needs care: `accelerate launch --cpu --num_processes 2` silently runs one
process. What really starts N ranks over gloo is `--multi_gpu --num_processes N` with
`ACCELERATE_USE_CPU=true`; the training script then checks the world size it was asked for.
On GPUs, a config from `configs/accelerate/` says how many. Accelerate only launches: DDP or FSDP2
is the training code's own (model/parallel.py).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from storage import ConfigError

log = logging.getLogger("kiln")
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


class LaunchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_processes: int = Field(1, ge=1, description="Processes (ranks): GPUs, or CPU processes over gloo.")
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With several processes: ddp (every rank holds the model) or fsdp (torch's FSDP2: "
                           "parameters, gradients and optimizer state sharded over the ranks).")
    accelerate_config: str | None = Field(
        None, description="A file in configs/accelerate (single_gpu, multi_gpu) or a path.")
    num_machines: int = Field(1, ge=1, description="Nodes; with more than one, set machine_rank and main_process_ip.")
    machine_rank: int = Field(0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int | None = Field(None, ge=1, le=65535, description="Rendezvous port; default: a free one.")

    @property
    def world_size(self) -> int:
        """Ranks in all: processes per machine times machines."""
        return self.num_processes * self.num_machines


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA
        return 0


def accelerate_command(script_module: str, run_json: Path, launch: LaunchConfig) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command line and environment for a run."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch.accelerate_config:
        path = Path(launch.accelerate_config)
        if not path.exists():
            path = ACCELERATE_CONFIGS / f"{launch.accelerate_config.removesuffix('.yaml')}.yaml"
        if not path.exists():
            raise ConfigError(f"{launch.accelerate_config}: no such accelerate config (see {ACCELERATE_CONFIGS})")
        args += ["--config_file", str(path)]
    gpus = _gpu_count()
    if launch.num_processes > 1 and gpus == 0:
        env["ACCELERATE_USE_CPU"] = "true"  # with --multi_gpu: N real CPU ranks over gloo
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.num_processes)))
        args += ["--multi_gpu"]
    elif launch.num_processes > 1 and not launch.accelerate_config:
        args += ["--multi_gpu"]
    elif gpus == 0:
        args += ["--cpu"]
    args += ["--num_processes", str(launch.world_size),
             "--num_machines", str(launch.num_machines), "--machine_rank", str(launch.machine_rank),
             "--main_process_port", str(launch.main_process_port or free_port())]
    if launch.main_process_ip:
        args += ["--main_process_ip", launch.main_process_ip]
    if not launch.accelerate_config:
        args += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # the script decides precision
    return [*args, "-m", script_module, str(run_json)], env


class TrainingFailed(RuntimeError):
    """The training process exited non-zero; retrying resumes from its last checkpoint."""


DRIVER_PID = "KILN_DRIVER_PID"  # the process that launched training; the ranks exit when it is gone


def run_accelerate(script_module: str, run_json: Path, launch: LaunchConfig, log_file: Path,
                   lock_fd: int | None = None) -> None:
    """Run to completion, streaming lines to the `kiln` logger (and all of them to log_file).

    The child gets its own process group; whatever ends this function early (an exception,
    Prefect cancelling the run, Ctrl-C) takes the whole group down with it. A SIGKILL of this
    process ends nothing, so: every rank exits within a second of this process's death
    (`exit_with_driver`), and the launcher inherits the artifact's lock (`lock_fd`) and holds
    it until its ranks are gone, so a rerun never resumes while an orphan still writes.
    """
    command, env = accelerate_command(script_module, run_json, launch)
    env[DRIVER_PID] = str(os.getpid())
    tail: collections.deque[str] = collections.deque(maxlen=40)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               bufsize=1, start_new_session=True, pass_fds=() if lock_fd is None else (lock_fd,))
    try:
        assert process.stdout is not None  # stdout=PIPE
        with open(log_file, "a") as sink:
            for line in process.stdout:
                sink.write(line)
                tail.append(line.rstrip())
                _forward(line.rstrip())
        code = process.wait()
    finally:
        stop_process_group(process)
    if code != 0:
        user_error = next((line for line in reversed(tail) if line.startswith("kiln:")), None)
        if user_error:
            raise ConfigError(user_error.removeprefix("kiln: "))
        raise TrainingFailed(f"training exited with status {code}; last lines:\n" + "\n".join(list(tail)[-15:]))


_last_other_line = 0.0


def _forward(line: str) -> None:
    """Our own progress lines go to the log; other output (library warnings) at most once a second."""
    global _last_other_line
    if not line:
        return
    if line.startswith("[") or line.startswith("kiln:"):
        log.info(line)
    elif time.monotonic() - _last_other_line > 1.0:
        _last_other_line = time.monotonic()
        log.info(line[:300])


def exit_with_driver(interval_s: float = 0.5) -> None:
    """In a training process: end it (exit status 1) as soon as the process named by
    $KILN_DRIVER_PID is gone, checked every `interval_s` by a daemon thread. A rank killed here
    is a rank killed anywhere: the rerun resumes from the last complete checkpoint."""
    pid = int(os.environ.get(DRIVER_PID, "0") or 0)
    if pid <= 0:
        return

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                print(f"kiln: the run that started this training (pid {pid}) is gone; stopping", flush=True)
                os._exit(1)
            except PermissionError:  # alive, someone else's: not ours, yet the pid exists
                continue

    threading.Thread(target=watch, name="kiln-driver-watch", daemon=True).start()


def stop_process_group(process: subprocess.Popen, grace_s: float = 10) -> None:
    """End a process started with start_new_session=True, and everything it started:
    SIGTERM, then SIGKILL if it is still there after `grace_s` seconds."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
