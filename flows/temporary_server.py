"""Prefect's temporary server, tied to the `kiln` process that started it.

Without a Prefect server to talk to, Prefect starts its own (uvicorn in a subprocess, ~200 MB,
listening on a port) and stops it at exit. A `kiln` command killed with SIGKILL runs no exit
handler, so that server lived on. Started here instead, the server process asks the kernel
(prctl PR_SET_PDEATHSIG) for SIGTERM when the process that started it dies, however it dies.
It is started from the main thread (the kernel's "parent" is the forking thread, and the main
thread lives as long as the process), and registered as the instance Prefect's own code asks
for (`SubprocessASGIServer()`, keyed by port None), as `prefect_test_harness` does for its
server, so Prefect uses it rather than starting another.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import types
from typing import Any

from storage.stage import KilnError

PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_S = 120.0


def _die_with_parent(parent: int) -> None:
    """In the forked child, before exec: SIGTERM when `parent` dies (and now, if it already has)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def start_tied_server() -> None:
    """Start Prefect's temporary server for this process unless one is registered already (a
    test harness's, or an earlier call's). Only from the main thread; elsewhere Prefect starts
    its own, as before."""
    from prefect.server.api import server as server_module

    if (threading.current_thread() is not threading.main_thread()
            or None in server_module.SubprocessASGIServer._instances):
        return

    class TiedServer(server_module.SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            parent = os.getpid()

            def popen(**kwargs: Any) -> subprocess.Popen:  # Prefect passes every argument by keyword
                return subprocess.Popen(**kwargs, preexec_fn=lambda: _die_with_parent(parent))

            # Prefect's method builds the command line; only its module's Popen is swapped, for this call
            server_module.subprocess = types.SimpleNamespace(  # type: ignore[assignment] # a stand-in module
                **{**vars(subprocess), "Popen": popen})
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = subprocess

    # Prefect's 20 s default is too short on a busy 2-core machine (measured: a traceback there)
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or STARTUP_TIMEOUT_S)
    try:
        # registered under port None, the key Prefect's own code asks for; `timeout` is compared with
        # elapsed seconds, so a float is what it means (its annotation says int)
        TiedServer().start(timeout=timeout)  # type: ignore[arg-type]
    except RuntimeError as err:
        raise KilnError(f"Prefect's temporary server did not answer in {timeout:.0f} s ({str(err)[:200]}); "
                        "start one with `kiln server`, "
                        "or raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") from None
