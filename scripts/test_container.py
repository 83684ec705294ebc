"""Run the image that scripts/container_image.py built, as a deployment would, and check it.

    python scripts/test_container.py      # `make test-container` builds first, then runs this

Each container is a `buildah run` of the image's own command on the host network, bound to
127.0.0.1 (TOKENRM_HOST), on free ports. The checks: the Dockerfile and docker-compose.yml
against the project; the image's size, user, command and HEALTHCHECK; /readyz; /score equal to
the project venv's server on the same items; gRPC health and Score; the server's uid; the
HEALTHCHECK command run in the container; the compose trainer's command against the server by
its service name; a mounted checkpoint served with TOKENRM_MODEL; SIGTERM ending each server
with exit 0; and no trace of this machine's pip settings, CA or paths in the exported layers.
Prints one line per check and 'N passed, M failed'; exits 1 on any failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from container_checks import (
    compose_is_consistent,
    dockerfile_covers_package,
    machine_traces,
    scan_layers,
)
from container_image import BUILDAH, IMAGE, ROOT, WORK

from tokenrm.server.launcher import free_port, start, stop

MAX_IMAGE_BYTES = 1.5e9
READY_TIMEOUT_S = 180.0
ITEMS: list[dict[str, Any]] = [
    {"prompt": "Facts: Ana lives in Lima. Question: Where does Ana live?",
     "response": "Ana lives in Quito."},
    {"prompt": "Facts: Sheizai lives in Porto. Question: Where does Sheizai live?",
     "response": "Sheizai lives in Porto.", "spans": [[0, 7], [7, 13], [13, 23]]},
    {"prompt_ids": [1, 57, 80], "response_ids": [311, 279, 12]},
]
results: list[tuple[bool, str, str]] = []


def check(name: str, test: Callable[[], str]) -> bool:
    """Run one check; a returned string is its detail, an exception its failure."""
    try:
        detail, ok = test(), True
    except Exception as exc:  # a failed check is reported, and the others still run
        detail, ok = f"{type(exc).__name__}: {exc}", False
    results.append((ok, name, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def failed(name: str, exc: BaseException) -> None:
    """A failure outside any one check (e.g. the container never became ready)."""
    results.append((False, name, f"{type(exc).__name__}: {exc}"))
    print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)


def buildah(*args: str) -> str:
    return subprocess.run([*BUILDAH, *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def image_config() -> dict[str, Any]:
    """The image's Docker-format config (User, Env, Cmd, Healthcheck)."""
    found = json.loads(buildah("inspect", "--type", "image", IMAGE))
    return dict(found["Docker"]["config"])


class Container:
    """A working container of the image; `run` starts a command in it as `docker run` would
    (the image's user, environment and working directory), on the host's network."""

    def __init__(self, env: dict[str, str], volumes: Sequence[str] = ()) -> None:
        self.name = buildah("from", "--pull=never", IMAGE)
        self.root = os.path.realpath(buildah("mount", self.name))
        self.flags = ["--isolation", "chroot", "--network", "host"]
        self.flags += [f for key, value in env.items() for f in ("--env", f"{key}={value}")]
        self.flags += [f for volume in volumes for f in ("--volume", volume)]
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in remove())
        self.proc: subprocess.Popen[str] | None = None

    def start(self, command: list[str]) -> subprocess.Popen[str]:
        self.proc = subprocess.Popen([*BUILDAH, "run", *self.flags, self.name, "--", *command],
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)
        return self.proc

    def run(self, command: list[str], *flags: str, timeout: float = 600) -> \
            subprocess.CompletedProcess[str]:
        return subprocess.run([*BUILDAH, "run", *self.flags, *flags, self.name, "--", *command],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def processes(self) -> list[int]:
        """The processes under the started `buildah run` (buildah's chroot helper, then the
        command), found by their parents: chroot isolation gives them no namespace to go by."""
        if self.proc is None:
            return []
        parents: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:  # pid (comm) state ppid ...; comm may hold spaces and parentheses
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(stat.parent.name)] = int(fields[1])
        found, frontier = [], [self.proc.pid]
        while frontier:
            children = [pid for pid, ppid in parents.items() if ppid in frontier]
            found += children
            frontier = children
        return found

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def remove(self) -> None:
        self.log.close()
        subprocess.run([*BUILDAH, "rm", self.name], capture_output=True, check=False)


@contextmanager
def serving(env: dict[str, str], volumes: Sequence[str] = ()) -> \
        Iterator[tuple[Container, Any]]:
    """The image's CMD in a new container; yields once /readyz answers 200."""
    container = Container(env, volumes)
    proc = container.start(list(image_config()["Cmd"]))
    began = time.monotonic()
    try:
        url = f"http://127.0.0.1:{env['TOKENRM_HTTP_PORT']}/readyz"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"exited {proc.returncode}:\n{container.output()[-3000:]}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - began > READY_TIMEOUT_S:
                raise TimeoutError(f"not ready in {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        proc.ready_s = time.monotonic() - began  # type: ignore[attr-defined]
        yield container, proc
    finally:
        for pid in container.processes():  # nothing of ours outlives the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        container.remove()


def server_env(http_port: int, grpc_port: int, **more: str) -> dict[str, str]:
    return {"TOKENRM_HOST": "127.0.0.1", "TOKENRM_HTTP_PORT": str(http_port),
            "TOKENRM_GRPC_PORT": str(grpc_port), **more}


def the_server(container: Container) -> int:
    """The one `tokenrm serve` process in the container (under buildah's chroot helper)."""
    pids = []
    for pid in container.processes():
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"serve" in command and b"chroot" not in command[0]:
                pids.append(pid)
    assert len(pids) == 1, f"expected one server process, found {pids}"
    return pids[0]


def score(port: int) -> dict[str, Any]:
    answer = httpx.post(f"http://127.0.0.1:{port}/score",
                        json={"items": ITEMS, "return_tokens": True}, timeout=60)
    answer.raise_for_status()
    return dict(answer.json())


def same_answers(ours: dict[str, Any], venv: dict[str, Any]) -> str:
    """Equal but for float noise in the rewards; returns the largest difference."""
    worst = 0.0
    assert ours["model"] == venv["model"], (ours["model"], venv["model"])
    assert ours.get("model_version") == venv.get("model_version")
    assert ours["usage"] == venv["usage"], (ours["usage"], venv["usage"])
    for a, b in zip(ours["results"], venv["results"], strict=True):
        for key in ("token_ids", "tokens", "offsets"):
            assert a[key] == b[key], (key, a[key], b[key])
        for key in ("rewards", "span_rewards"):
            x, y = a[key] or [], b[key] or []
            assert len(x) == len(y), (key, x, y)
            worst = max([worst, *(abs(p - q) for p, q in zip(x, y, strict=True))])
        worst = max(worst, abs(a["total"] - b["total"]))
    assert worst <= 1e-5, f"rewards differ by up to {worst:g}"
    tokens = sum(len(r["rewards"]) for r in ours["results"])
    return f"{len(ITEMS)} items, {tokens} token rewards, model {ours['model']}; " \
           f"largest difference {worst:g}"


def grpc_health(port: int) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        states = {name or "(server)": stub.Check(health_pb2.HealthCheckRequest(service=name),
                                                 timeout=10).status
                  for name in ("", "tokenrm.v1.RewardService")}
    serving = health_pb2.HealthCheckResponse.SERVING
    assert all(s == serving for s in states.values()), states
    return ", ".join(f"{k} SERVING" for k in states)


def grpc_equals_http(grpc_port: int, http_answer: dict[str, Any]) -> str:
    from tokenrm.client import RewardClient

    with RewardClient(f"grpc://127.0.0.1:{grpc_port}", timeout_s=60) as client:
        scores = client.score(ITEMS)
    for got, want in zip(scores, http_answer["results"], strict=True):
        assert list(got.token_ids) == want["token_ids"]
        assert max(abs(float(p) - q) for p, q in zip(got.rewards, want["rewards"],
                                                     strict=True)) <= 1e-5
    return f"Score over gRPC equals /score for {len(scores)} items"


def runs_as_non_root(container: Container) -> str:
    pid = the_server(container)
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()  # type: ignore[union-attr]
    gids = re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()  # type: ignore[union-attr]
    assert set(uids) == {"10001"} and set(gids) == {"10001"}, (uids, gids)
    return f"pid {pid}: uid {'/'.join(uids)}, gid {'/'.join(gids)} (real/effective/saved/fs)"


def healthcheck_passes(container: Container, port: int) -> str:
    test = list(image_config()["Healthcheck"]["Test"])
    command = test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]
    passed = container.run(command, "--env", f"TOKENRM_HTTP_PORT={port}", timeout=30)
    assert passed.returncode == 0, passed.stderr[-2000:]
    closed = container.run(command, "--env", f"TOKENRM_HTTP_PORT={free_port()}", timeout=30)
    assert closed.returncode != 0, "passes against a port nobody listens on"
    return f"exit 0 against the server; exit {closed.returncode} against a closed port"


def sigterm_exits_zero(container: Container, proc: subprocess.Popen[str]) -> str:
    pid = the_server(container)
    began = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    code = proc.wait(timeout=60)
    assert code == 0, f"exit {code}:\n{container.output()[-2000:]}"
    assert not container.processes(), "processes left in the container"
    return f"exit 0 in {time.monotonic() - began:.1f} s"


def trainer_reaches_server(container: Container, grpc_port: int) -> str:
    """The compose trainer's command and environment, run from the image with the service name
    resolving to this machine (as compose's network does), kept short by appended flags."""
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    trainer = compose["services"]["trainer"]
    command = [str(c) for c in trainer["command"]]
    env = {str(k): str(v) for k, v in (trainer.get("environment") or {}).items()}
    name = next(n for n, s in compose["services"].items() if "build" in s)
    text = " ".join(command + list(env.values()))
    assert f"//{name}:" in text, f"the trainer does not name the service {name!r}"
    command = [c.replace(f"//{name}:50051", f"//{name}:{grpc_port}") for c in command]
    quick = ["--iterations", "1", "--prompts", "2", "--samples", "2", "--max-new-tokens", "12",
             "--no-progress"]
    with tempfile.TemporaryDirectory() as tmp:
        hosts = Path(tmp) / "hosts"
        hosts.write_text(f"127.0.0.1 localhost {name}\n")
        hosts.chmod(0o644)
        Path(tmp).chmod(0o755)
        flags = [f for k, v in env.items() for f in ("--env", f"{k}={v}")]
        done = container.run([*command, *quick], *flags, "--volume",
                             f"{hosts}:/etc/hosts:ro", timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return f"`{' '.join(command[:4])} …` ran 1 PPO iteration against {name}:{grpc_port}"


def container_checks(venv: dict[str, Any], ports: tuple[int, int]) -> None:
    http_port, grpc_port = ports
    try:
        with serving(server_env(http_port, grpc_port)) as (container, proc):
            check("starts and is ready", lambda: f"/readyz 200 after {proc.ready_s:.1f} s")
            answer = score(http_port)
            check("/score equals the venv's server", lambda: same_answers(answer, venv))
            check("gRPC health", lambda: grpc_health(grpc_port))
            check("gRPC Score", lambda: grpc_equals_http(grpc_port, answer))
            check("runs as non-root", lambda: runs_as_non_root(container))
            check("HEALTHCHECK command", lambda: healthcheck_passes(container, http_port))
            check("compose trainer reaches the server by name",
                  lambda: trainer_reaches_server(container, grpc_port))
            check("SIGTERM stops it with exit 0", lambda: sigterm_exits_zero(container, proc))
    except Exception as exc:  # it did not start, or did not stop: the checks left undone fail
        failed("the demo model's container", exc)


def mounted_checkpoint(ports: tuple[int, int]) -> None:
    """A checkpoint from the host, mounted read-only and named by TOKENRM_MODEL (the sequence
    RM, so its answers differ from the default's), against the venv's server of that directory."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "rm"
        shutil.copytree(ROOT / "demo" / "demo-seq-rm", ckpt)
        for path in [Path(tmp), ckpt, *ckpt.iterdir()]:  # readable by the image's user
            path.chmod(0o755 if path.is_dir() else 0o644)
        venv_port, venv_grpc = free_port(), free_port()
        venv = start(ckpt, venv_port, venv_grpc, timeout_s=READY_TIMEOUT_S)
        try:
            want = score(venv_port)
        finally:
            stop(venv)
        env = server_env(*ports, TOKENRM_MODEL="/models/rm")
        port = ports[0]
        try:
            with serving(env, [f"{ckpt}:/models/rm:ro"]) as (container, proc):
                got = score(port)
                check("mounted checkpoint via TOKENRM_MODEL",
                      lambda: "served as 'rm': " + same_answers(got, want))
                check("SIGTERM stops it with exit 0 (mounted)",
                      lambda: sigterm_exits_zero(container, proc))
        except Exception as exc:
            failed("the mounted checkpoint's container", exc)


def image_checks() -> None:
    config = image_config()
    check("image config", lambda: image_facts(config))
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        exported = Path(tmp) / "image"
        buildah("push", IMAGE, f"dir:{exported}")
        scan = scan_layers(exported, machine_traces())
    check("image size", lambda: size_within(scan.layer_bytes))
    check("the package and demo models in the image", scan.has_the_package)
    check("no machine traces in the layers", lambda: scan.verdict())
    seconds = WORK / "build-seconds"
    check("build time", lambda: f"{seconds.read_text().strip()} s (the last `make container`)")


def image_facts(config: dict[str, Any]) -> str:
    assert config.get("User") == "10001:10001", config.get("User")
    assert config.get("Cmd") == ["tokenrm", "serve"], config.get("Cmd")
    assert config.get("Healthcheck", {}).get("Test"), "no HEALTHCHECK"
    env = dict(e.split("=", 1) for e in config.get("Env", []))
    assert env.get("TOKENRM_HOST") == "0.0.0.0", env
    assert not {"TOKENRM_MODEL", "TOKENRM_API_KEYS"} & set(env), env
    return "user 10001:10001, CMD tokenrm serve, HEALTHCHECK set, TOKENRM_HOST=0.0.0.0"


def size_within(layer_bytes: int) -> str:
    assert layer_bytes <= MAX_IMAGE_BYTES, f"{layer_bytes / 1e9:.2f} GB"
    return f"{layer_bytes / 1e6:.0f} MB uncompressed (floor {MAX_IMAGE_BYTES / 1e9:.1f} GB)"


def main() -> None:
    began = time.monotonic()
    check("Dockerfile and .dockerignore cover the package", dockerfile_covers_package)
    check("docker-compose.yml", compose_is_consistent)
    image_checks()
    from tokenrm import demo

    ports = (free_port(), free_port())
    venv_port = free_port()
    venv = start(demo.checkpoint(), venv_port, free_port(), timeout_s=READY_TIMEOUT_S)
    try:
        venv_answer = score(venv_port)
    finally:
        stop(venv)
    container_checks(venv_answer, ports)
    mounted_checkpoint((free_port(), free_port()))  # not the first's: a live one would answer
    failed = sum(not ok for ok, _, _ in results)
    print(f"container test: {time.monotonic() - began:.0f} s")
    print(f"{len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
