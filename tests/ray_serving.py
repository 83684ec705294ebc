"""`tokenrm serve --ray` for the Ray tests: a local Ray started by the server process (Ray's
auth token off, as in a test sandbox), stopped with it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tokenrm.server.launcher import Running, free_port, launch, stop

RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


@contextmanager
def ray_serving(checkpoint: Path, *flags: str, env: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> Iterator[Running]:
    port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "tokenrm.cli.main", "serve", "--ray", "--model",
               str(checkpoint), "--port", str(port), "--grpc-port", str(grpc_port), *flags]
    proc = launch(command, f"http://127.0.0.1:{port}/readyz", name="tokenrm serve --ray",
                  env={**RAY_ENV, **(env or {})}, headers=headers, timeout_s=180)
    try:
        yield Running(f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", proc)
    finally:
        stop(proc)
        assert proc.returncode == 0


def on_ray(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a command that joins the local Ray (`tokenrm ray-update ...`, a tests script)."""
    return subprocess.run([sys.executable, *args], env={**os.environ, **RAY_ENV},
                          capture_output=True, text=True, timeout=240, check=False)
