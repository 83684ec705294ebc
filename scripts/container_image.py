"""Build the container image here, where there is no Docker daemon and no registry: a Debian
base made by debootstrap, then the Dockerfile built by buildah with this machine's pip settings.

    python scripts/container_image.py base    # localhost/tokenrm-base:bookworm-<recipe>, once
    python scripts/container_image.py build   # localhost/tokenrm:test from the Dockerfile

pip inside the build needs this machine's settings (its index, local wheels, CA bundle): they
are given as a build secret (a pip.conf at /etc/pip.conf) and a read-only mount at /mnt of the
files it names, hard-linked under build/container/pip-root with their paths kept (/opt/wheels
appears at /mnt/opt/wheels). /mnt exists in the base, so no mount point is left in a layer, and
`scripts/test_container.py` greps the exported layers for all of it. Heavy steps run at nice 19.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "container"
BASE_NAME = "localhost/tokenrm-base"  # tagged by SUITE and a hash of its recipe (base_image())
IMAGE = "localhost/tokenrm:test"
SUITE, PACKAGES = "bookworm", "python3,python3-venv"  # Python 3.11, as the torch wheels here
BASE_CONTAINERFILE = 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n'
MOUNT = "/mnt"  # where the staged pip files appear in the build
NICE = ["nice", "-n", "19"]
BUILDAH = ["buildah", "--storage-driver", "vfs"]
# pip options whose values name local files or folders (several, space-separated, for some).
PATH_OPTIONS = {"cert", "client-cert", "constraint", "build-constraint", "find-links",
                "index-url", "extra-index-url"}
DROPPED_OPTIONS = {"cache-dir", "log", "no-cache-dir"}  # the build has its own cache mount


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", shlex.join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kwargs)  # type: ignore[call-overload]


def image_exists(name: str) -> bool:
    found = subprocess.run([*BUILDAH, "inspect", "--type", "image", name],
                           capture_output=True, check=False)
    return found.returncode == 0


# ---------------------------------------------------------------------------------- the base

def base_image() -> str:
    """The base's name: a new recipe (suite, packages, what `tidy` removes) gets a new tag, so a
    cached base is never one made by an older recipe."""
    recipe = f"{SUITE} {PACKAGES} {BASE_CONTAINERFILE}" + inspect.getsource(tidy)
    return f"{BASE_NAME}:{SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"


def debian_mirror() -> list[str]:
    """The Debian mirror this machine's apt uses, as debootstrap's argument (none: its default)."""
    sources = [*Path("/etc/apt/sources.list.d").glob("*.sources"), Path("/etc/apt/sources.list")]
    for path in sources:
        text = path.read_text() if path.is_file() else ""
        found = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.M) or \
            re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s", text, re.M)
        if found:
            return [found.group(1)]
    return []


def tidy(rootfs: Path) -> None:
    """What debootstrap leaves that an image should not carry: package caches and lists, this
    machine's resolver, hostname and the bootstrap log (it names the host's target folder);
    and, as Debian's slim images do, manuals, translations and docs but their copyright files."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
                    "var/log/bootstrap.log", "usr/share/man/*", "usr/share/info/*",
                    "usr/share/locale/*", "usr/share/doc/*/*"):
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.name != "copyright":
                path.unlink()
    (rootfs / "etc/resolv.conf").write_text("")
    (rootfs / "etc/hostname").write_text("localhost\n")


def build_base(force: bool) -> None:
    """Debian `SUITE` with python3 and python3-venv as a local image, made once per machine."""
    if image_exists(base_image()) and not force:
        print(f"{base_image()}: cached")
        return
    start = time.monotonic()
    shutil.rmtree(WORK / "base", ignore_errors=True)
    rootfs = WORK / "base" / "rootfs"
    rootfs.parent.mkdir(parents=True)
    run([*NICE, "debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(rootfs),
         *debian_mirror()], stdout=subprocess.DEVNULL)
    tidy(rootfs)
    context = WORK / "base" / "context"
    context.mkdir()
    run([*NICE, "tar", "--numeric-owner", "-C", str(rootfs), "-cf",
         str(context / "rootfs.tar"), "."])
    shutil.rmtree(rootfs)
    (context / "Containerfile").write_text(BASE_CONTAINERFILE)
    run([*NICE, *BUILDAH, "bud", "--isolation", "chroot", "-t", base_image(), str(context)])
    shutil.rmtree(WORK / "base")
    listed = subprocess.run([*BUILDAH, "images", "--format", "{{.Name}}:{{.Tag}}"],
                            capture_output=True, text=True, check=True).stdout.split()
    for older in (n for n in listed if n.startswith(BASE_NAME + ":") and n != base_image()):
        run([*BUILDAH, "rmi", older], stdout=subprocess.DEVNULL)  # made by an older recipe
    print(f"{base_image()}: built in {time.monotonic() - start:.0f} s")


# ----------------------------------------------------------------------- pip's settings, staged

def pip_settings() -> dict[str, str]:
    """pip's effective settings here (files and PIP_* variables), as `pip config list` shows
    them; a variable beats an install-section value, which beats a global one."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                            text=True, check=True).stdout
    ranked: dict[str, tuple[int, str]] = {}
    rank = {"global": 0, "install": 1, ":env:": 2}
    for line in listed.splitlines():
        found = re.match(r"^([^.]+)\.([^=]+)='(.*)'$", line)
        if found and found.group(1) in rank:
            section, key, value = found.groups()
            if rank[section] >= ranked.get(key, (-1, ""))[0]:
                ranked[key] = (rank[section], value)
    return {key: value for key, (_, value) in ranked.items() if key not in DROPPED_OPTIONS}


def local_path(value: str) -> Path | None:
    """The local file or folder a setting's value names, if it names one."""
    if value.startswith("file:"):
        return Path(unquote(urlparse(value).path))
    return Path(value) if value.startswith("/") else None


def stage(path: Path, root: Path) -> None:
    """`path` at root/path: hard links where they can be made (no bytes copied), else a copy."""
    target = root / path.relative_to("/")
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        try:
            run(["cp", "-al", str(path), str(target)], stdout=subprocess.DEVNULL)
        except subprocess.CalledProcessError:
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(path, target)
    else:
        try:
            os.link(path.resolve(), target)
        except OSError:
            shutil.copy2(path, target)


def staged_pip_config(root: Path) -> str:
    """A pip.conf for the build: this machine's settings with every local path moved under
    MOUNT, and those files staged under `root`. A local index (file:) is staged with its parent
    folder, since its pages link to files beside it (simple/ next to files/)."""
    lines = ["[global]"]
    for key, value in sorted(pip_settings().items()):
        if key in PATH_OPTIONS:
            words = []
            for word in value.split():
                path = local_path(word)
                if path is None or not path.exists():
                    words.append(word)
                    continue
                stage(path.parent if word.startswith("file:") else path, root)
                moved = MOUNT + str(path)
                words.append("file://" + moved if word.startswith("file:") else moved)
            value = " ".join(words)
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- the image

def build_image(torch_index: str | None) -> None:
    """The Dockerfile, built by buildah on the local base, with the staged pip settings."""
    if not image_exists(base_image()):
        raise SystemExit(f"{base_image()} is missing: run `make container-base` first")
    pip_root = WORK / "pip-root"
    shutil.rmtree(pip_root, ignore_errors=True)
    pip_root.mkdir(parents=True)
    pip_conf = WORK / "pip.conf"
    pip_conf.write_text(staged_pip_config(pip_root))
    print(pip_conf.read_text(), end="")
    # Empty TORCH_INDEX: pip's own settings find torch (here the CPU wheel among local wheels).
    index = "" if torch_index is None else torch_index
    # No --layers: with the vfs driver every cached step would be a full copy of the file
    # system (tens of GB, and slower than building). The base is the cache that counts.
    start = time.monotonic()
    try:
        run([*NICE, *BUILDAH, "bud", "--isolation", "chroot", "--format", "docker",
             "--pull=never", "--build-arg", f"BASE_IMAGE={base_image()}",
             "--build-arg", f"TORCH_INDEX={index}", "--secret", f"id=pip.conf,src={pip_conf}",
             "--volume", f"{pip_root}:{MOUNT}:ro", "-t", IMAGE, "-f", str(ROOT / "Dockerfile"),
             str(ROOT)])
    finally:
        shutil.rmtree(pip_root, ignore_errors=True)
        pip_conf.unlink(missing_ok=True)
    run([*BUILDAH, "rmi", "--prune"], stdout=subprocess.DEVNULL)  # earlier builds' images
    elapsed = time.monotonic() - start
    (WORK / "build-seconds").write_text(f"{elapsed:.0f}\n")
    print(f"{IMAGE}: built in {elapsed:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("base", help="the Debian base image (cached)")
    base.add_argument("--force", action="store_true", help="build it again")
    image = sub.add_parser("build", help="the tokenrm image from the Dockerfile")
    image.add_argument("--torch-index", help="TORCH_INDEX; default: empty (pip's settings)")
    args = parser.parse_args()
    if args.command == "base":
        build_base(args.force)
    else:
        build_image(args.torch_index)


if __name__ == "__main__":
    main()
