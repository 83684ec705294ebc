"""The container test's checks that need no running container: the Dockerfile and
docker-compose.yml against the project, and the exported image's layers searched for traces of
this machine (its pip settings, CA certificates and paths). Used by scripts/test_container.py."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shlex
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import tomllib
from container_image import MOUNT, PATH_OPTIONS, ROOT, WORK, local_path, pip_settings

# Names under which nothing may be left in a layer: the mount of the staged pip files, the
# pip.conf secret, pip's cache mount.
INSTALLED = re.compile(r"site-packages/tokenrm/(\w+)/__init__\.py$"
                       r"|site-packages/tokenrm/(demo/demo-[\w-]+)/model\.safetensors$")
DEMO_MODELS = ("demo-token-rm", "demo-seq-rm", "demo-policy")
LEFTOVERS = re.compile(r"^(\./)?(mnt/.+|etc/pip\.conf|run/secrets/.+|root/\.cache/pip/.+)$")


# ------------------------------------------------------------------------------- the Dockerfile

def package_folders() -> list[str]:
    """The folders pyproject.toml maps into the tokenrm namespace."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return sorted(set(pyproject["tool"]["setuptools"]["package-dir"].values()))


def dockerfile_args() -> set[str]:
    return set(re.findall(r"^ARG\s+(\w+)", (ROOT / "Dockerfile").read_text(), re.M))


def dockerfile_covers_package() -> str:
    """The build context (.dockerignore's allow-list) holds every package folder, and the
    builder copies all of it."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY \. /src/$", dockerfile, re.M), "the builder does not copy ./"
    allowed = re.findall(r"^!(\S+)/$", (ROOT / ".dockerignore").read_text(), re.M)
    folders = package_folders()
    assert not set(folders) - set(allowed), f"not in .dockerignore: {set(folders) - set(allowed)}"
    return f"the context lets through all {len(folders)} package folders ({', '.join(folders)})"


# ------------------------------------------------------------------------------- compose

@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def known_variables() -> set[str]:
    """The server's settings and the integrations' options, as TOKENRM_* variables."""
    from tokenrm.integrations.options import Options
    from tokenrm.server.settings import Settings

    names = {f"TOKENRM_{name.upper()}" for name in Settings.model_fields}
    return names | {f"TOKENRM_{name.upper()}" for name in Options.__dataclass_fields__} \
        | {"TOKENRM_URL"}


def compose_is_consistent() -> str:
    """docker-compose validates it; every TOKENRM_* it names (comments too) is a real setting;
    each service's environment is valid settings, its command parses with `tokenrm`'s own
    parser, its build args are the Dockerfile's; the trainer waits for a healthy server and
    names it by its service name on a port the server listens on."""
    import yaml

    from tokenrm.cli.main import _parser
    from tokenrm.server.settings import Settings

    validated = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"),
                                "config", "--quiet"], capture_output=True, text=True, check=False)
    assert validated.returncode == 0, f"docker-compose config: {validated.stderr.strip()}"
    text = (ROOT / "docker-compose.yml").read_text()
    services: dict[str, Any] = yaml.safe_load(text)["services"]
    unknown = set(re.findall(r"\bTOKENRM_[A-Z_]+\b", text)) - known_variables()
    assert not unknown, f"not settings of tokenrm: {unknown}"
    [server] = [name for name, s in services.items() if "build" in s]
    server_env = {k: str(v) for k, v in (services[server].get("environment") or {}).items()}
    with environment(server_env):  # pydantic-settings reads them; mypy sees no defaults
        settings = Settings()  # type: ignore[call-arg]
    args = set(services[server]["build"].get("args") or {})
    assert args <= dockerfile_args(), f"not ARGs of the Dockerfile: {args - dockerfile_args()}"
    published = {str(p).rsplit(":", 1)[-1] for p in services[server].get("ports", [])}
    assert published == {str(settings.http_port), str(settings.grpc_port)}, published
    commands = 0
    for name, service in services.items():
        command = service.get("command")
        if command is not None:
            words = shlex.split(command) if isinstance(command, str) else list(command)
            assert words[0] == "tokenrm", f"{name}: runs {words[0]}, not tokenrm"
            _parser().parse_args([str(w) for w in words[1:]])  # exits 2 on a wrong argument
            commands += 1
        assert service.get("image") == services[server].get("image"), f"{name}: another image"
    trainers = [n for n in services if n != server]
    for name in trainers:
        assert services[name]["depends_on"][server]["condition"] == "service_healthy", name
        line = " ".join(map(str, services[name].get("command") or []))
        ports = {str(settings.http_port), str(settings.grpc_port)}
        found = re.findall(rf"//{re.escape(server)}:(\d+)", line)
        assert found and set(found) <= ports, f"{name} does not reach {server} by name: {line}"
    return (f"valid for docker-compose; services {', '.join(services)}; their settings valid; "
            f"{commands} tokenrm command(s) parse; {', '.join(trainers)} waits for {server!r} "
            "to be healthy and names it by its service name")


# ------------------------------------------------------------------------------- the layers

def custom_certificates(bundle: Path) -> list[bytes]:
    """A line of each certificate in `bundle` that is not among Debian's public ones (the
    ca-certificates package), i.e. what this machine added."""
    public = b"".join(p.read_bytes() for p in Path("/usr/share/ca-certificates").rglob("*.crt"))
    assert public, "no public certificates to tell this machine's own from (ca-certificates)"
    found = []
    for pem in re.findall(rb"-----BEGIN CERTIFICATE-----\n(.*?)-----END",
                          bundle.read_bytes(), re.S):
        body = b"".join(pem.split())
        if body not in b"".join(public.split()):
            lines = pem.split()
            found.append(lines[len(lines) // 2])  # 64 base64 characters, unique to it
    return found


def machine_traces() -> dict[str, bytes]:
    """What must not be in the image, by label: every file, folder and index that pip's settings
    name here (also as the build saw them, under MOUNT), the certificates this machine added
    to its CA bundle, the checkout's and the staging folder's paths, this machine's resolvers."""
    from pip._internal.models.index import PyPI

    traces: dict[str, bytes] = {}
    for key, value in pip_settings().items():
        if key == "cert":
            for i, line in enumerate(custom_certificates(Path(value))):
                traces[f"CA certificate {i + 1} added to {value}"] = line
        elif key in PATH_OPTIONS:
            for word in value.split():
                if word.rstrip("/") == PyPI.simple_url.rstrip("/"):
                    continue  # pip's own default, in pip's source in every image
                traces[f"pip {key} {word}"] = word.encode()
                path = local_path(word)
                if path is not None:
                    traces[f"pip {key} {path}"] = str(path).encode()
                    traces[f"pip {key} {word} (in the build)"] = (MOUNT + str(path)).encode()
    traces["the checkout's path"] = str(ROOT).encode()
    traces["the build's staging folder"] = str(WORK).encode()
    resolv = Path("/etc/resolv.conf")
    for ip in re.findall(r"^nameserver\s+(\S+)", resolv.read_text() if resolv.exists() else "",
                         re.M):
        if not ip.startswith("127."):
            traces[f"resolver {ip}"] = ip.encode()
    return traces


class ScanningReader(io.RawIOBase):
    """A stream that searches what passes through it for every trace, across chunk borders."""

    def __init__(self, raw: BinaryIO, traces: dict[str, bytes], hits: set[str]) -> None:
        self.raw, self.traces, self.hits = raw, traces, hits
        self.tail, self.count = b"", 0
        self.keep = max(len(t) for t in traces.values()) - 1

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        window = self.tail + data
        self.hits.update(label for label, t in self.traces.items() if t in window)
        self.tail = window[-self.keep:] if self.keep else b""
        self.count += len(data)
        buffer[:len(data)] = data
        return len(data)


@dataclass
class Scan:
    layers: int = 0
    layer_bytes: int = 0
    traces: int = 0
    hits: set[str] = field(default_factory=set)
    leftovers: list[str] = field(default_factory=list)
    installed: set[str] = field(default_factory=set)  # tokenrm's packages and demo models

    def has_the_package(self) -> str:
        """Every package folder installed as tokenrm.<folder>, and the demo models with it."""
        want = {*package_folders(), *(f"demo/{m}" for m in DEMO_MODELS)}
        assert want <= self.installed, f"not in the image: {sorted(want - self.installed)}"
        return (f"tokenrm.{{{','.join(package_folders())}}} installed, with "
                f"{', '.join(DEMO_MODELS)}")

    def verdict(self) -> str:
        assert not self.hits, f"found: {sorted(self.hits)}"
        assert not self.leftovers, f"left in a layer: {self.leftovers[:10]}"
        return (f"{self.layers} layers ({self.layer_bytes / 1e6:.0f} MB) and the config: none "
                f"of {self.traces} traces (pip settings, added CA certificates, this machine's "
                "paths and resolvers); no mount point, secret or pip cache left")


def open_blob(path: Path) -> BinaryIO:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    assert magic != b"\x28\xb5\x2f\xfd", f"{path.name}: zstd layers are not read here"
    return path.open("rb")


def scan_layers(exported: Path, traces: dict[str, bytes]) -> Scan:
    """Every layer (each byte of its tar stream: names, links, contents) and the config of an
    image written by `buildah push IMAGE dir:PATH`."""
    manifest = json.loads((exported / "manifest.json").read_text())
    scan = Scan(traces=len(traces))
    config = (exported / manifest["config"]["digest"].split(":")[1]).read_bytes()
    scan.hits.update(label for label, t in traces.items() if t in config)
    for layer in manifest["layers"]:
        with open_blob(exported / layer["digest"].split(":")[1]) as raw:
            reader = ScanningReader(raw, traces, scan.hits)
            with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 22), mode="r|") as tar:
                for member in tar:
                    if LEFTOVERS.match(member.name):
                        scan.leftovers.append(member.name)
                    found = INSTALLED.search(member.name)
                    if found:
                        scan.installed.add(found.group(1) or found.group(2))
            while reader.read(1 << 22):  # the padding after the last member
                pass
        scan.layers += 1
        scan.layer_bytes += reader.count
    return scan
