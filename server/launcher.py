"""Start `tokenrm serve` (or any server command) as a child process on 127.0.0.1 and wait
until it answers: a public helper for tests, benchmarks and experiments.

    from tokenrm.server.launcher import serve

    with serve(checkpoint_dir) as running:        # free ports; SIGTERM on exit
        client = RewardClient(running.url)        # or f"grpc://{running.grpc_target}"
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_LOGS: dict[int, IO[str]] = {}  # server output files by process id, closed by stop()


@dataclass(frozen=True)
class Running:
    url: str                      # http://127.0.0.1:<port>
    grpc_target: str              # 127.0.0.1:<port>, for grpc channels
    process: subprocess.Popen[str]


def start(model: Path, port: int, grpc_port: int, env: dict[str, str] | None = None,
          timeout_s: float = 60.0) -> subprocess.Popen[str]:
    """`tokenrm serve` on the given ports; returns once GET /readyz answers 200."""
    cmd = [sys.executable, "-m", "tokenrm.cli.main", "serve", "--model", str(model),
           "--port", str(port), "--grpc-port", str(grpc_port)]
    keys = (env or {}).get("TOKENRM_API_KEYS")
    headers = {"authorization": f"Bearer {keys.split(',')[0]}"} if keys else {}
    return launch(cmd, f"http://127.0.0.1:{port}/readyz", name="tokenrm serve", env=env,
                  headers=headers, timeout_s=timeout_s)


def launch(command: list[str], ready_url: str, *, name: str = "server",
           env: dict[str, str] | None = None, headers: dict[str, str] | None = None,
           timeout_s: float = 60.0) -> subprocess.Popen[str]:
    """Start a server process; return once GET `ready_url` answers 200. Its output goes to a
    temporary file (a pipe nobody reads would block it once full), shown if it dies."""
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by stop())
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    _LOGS[proc.pid] = log
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read()[-4000:]}")
        try:
            if httpx.get(ready_url, headers=headers, timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise TimeoutError(f"{name} not ready within {timeout_s} s")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM (a graceful drain), then SIGKILL if it has not exited within 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log = _LOGS.pop(proc.pid, None)
    if log is not None:
        log.close()


@contextmanager
def serve(model: Path, env: dict[str, str] | None = None, timeout_s: float = 60.0
          ) -> Iterator[Running]:
    """Start the server (HTTP and gRPC) on free ports, yield where it listens once ready,
    then stop it (unless the test already did)."""
    port, grpc_port = free_port(), free_port()
    proc = start(model, port, grpc_port, env, timeout_s)
    try:
        yield Running(f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", proc)
    finally:
        stop(proc)
