"""The demo models: the demo preset's is shipped with the package (tokenrm.demo; `rebuild`
trains it again); other presets' are built on first use and cached per recipe version."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from platformdirs import user_cache_dir

from tokenrm import demo as shipped
from tokenrm.training import synth
from tokenrm.training.data import write_pairs
from tokenrm.training.presets import PRESETS, Preset
from tokenrm.training.train import TrainOptions, train_rm

log = logging.getLogger(__name__)

# Bump when the recipe changes in a way the preset does not show (data, labels, training code).
RECIPE = "5"
DATA_SEED, EVAL_SEED, TRAIN_SEED = 1, 2, 0


def recipe_key(preset: Preset) -> str:
    """A short key that changes whenever the recipe or the preset does."""
    text = json.dumps({"recipe": RECIPE, "preset": preset.to_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(user_cache_dir("tokenrm"))


# Below this held-out pairwise accuracy the build says so: the recipe reaches ~0.99, but how soon
# training learns to look facts up depends on the seed and could differ on other hardware.
WARN_BELOW_PAIRWISE = 0.9


def build_checkpoint(out: Path, preset: Preset, progress: bool = True) -> None:
    """Synthesize the preset's data and train on it, writing the checkpoint to `out`."""
    with tempfile.TemporaryDirectory(prefix="tokenrm-data-") as tmp:
        data = Path(tmp)
        write_pairs(data / "train.jsonl", synth.generate(DATA_SEED, preset.n_train))
        write_pairs(data / "eval.jsonl", synth.generate(EVAL_SEED, preset.n_eval))
        trained = train_rm(data, out, preset, TrainOptions(seed=TRAIN_SEED, progress=progress))
    written = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps({"recipe": recipe_key(preset), **written},
                                                 indent=2) + "\n")
    metrics = trained.metrics["eval"]
    log.info("built %s: %s", out, metrics)
    if (metrics["pairwise_accuracy"] or 0.0) < WARN_BELOW_PAIRWISE:
        log.warning("the model trained poorly here (held-out pairwise accuracy %.3f < %.2f); "
                    "its rewards will be weak. metrics.json has the details.",
                    metrics["pairwise_accuracy"] or 0.0, WARN_BELOW_PAIRWISE)


def cached_build(root: Path, name: str, build: Callable[[Path], object]) -> Path:
    """root/name, made first by `build(directory)` if it is not there yet.

    Concurrent callers wait on a lock; a build that fails leaves nothing behind.
    """
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        log.warning("building %s (once; a few minutes on a CPU)", target)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            build(staging)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def demo_checkpoint(cache_dir: Path | None = None, preset_name: str = "demo",
                    progress: bool = True) -> Path:
    """The demo preset's shipped checkpoint; another preset's cached one, built first if this
    recipe has none yet."""
    if preset_name == "demo":
        return shipped.checkpoint()
    preset = PRESETS[preset_name]
    return cached_build(cache_dir or default_cache_dir(), f"{preset_name}-{recipe_key(preset)}",
                        lambda out: build_checkpoint(out, preset, progress))


def shipped_recipe() -> str | None:
    """The recipe key the shipped demo checkpoint was trained by."""
    metrics = json.loads((shipped.checkpoint() / "metrics.json").read_text())
    return metrics.get("recipe")


def rebuild(progress: bool = True) -> Path:
    """Train the demo preset again, into the package's demo/demo-token-rm directory (of a source
    checkout: the one an editable install links to). A failed build leaves the old one."""
    target = Path(shipped.__file__).resolve().parent / shipped.NAME
    staging = Path(tempfile.mkdtemp(prefix=".rebuild-", dir=target.parent))
    old = target.with_name(".rebuild-old")
    try:
        build_checkpoint(staging, PRESETS["demo"], progress)
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
