"""Run `tokenrm serve` as a real process on 127.0.0.1 for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Running:
    url: str                      # http://127.0.0.1:<port>
    grpc_target: str              # 127.0.0.1:<port>, for grpc channels
    process: subprocess.Popen[str]


@contextmanager
def serve(model: Path, env: dict[str, str] | None = None, timeout_s: float = 60.0
          ) -> Iterator[Running]:
    """Start the server (HTTP and gRPC), wait until /readyz answers, yield where it listens,
    then SIGTERM it (unless the test already stopped it)."""
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "tokenrm.cli.main", "serve", "--model", str(model),
           "--port", str(port), "--grpc-port", str(grpc_port)]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    headers = {"authorization": f"Bearer {env['TOKENRM_API_KEYS'].split(',')[0]}"} \
        if env and env.get("TOKENRM_API_KEYS") else {}
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/readyz", headers=headers, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready within {timeout_s} s")
            time.sleep(0.2)
        yield Running(url, f"127.0.0.1:{grpc_port}", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
