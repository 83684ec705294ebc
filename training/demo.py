"""The demo model: built on first use from the demo preset, cached per recipe version."""

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

from tokenrm.training import synth
from tokenrm.training.data import write_pairs
from tokenrm.training.presets import PRESETS, Preset
from tokenrm.training.train import TrainOptions, train_rm

log = logging.getLogger(__name__)

# Bump when the recipe changes in a way the preset does not show (data, labels, training code).
RECIPE = "5"
DATA_SEED, EVAL_SEED, TRAIN_SEED = 1, 2, 0
DEMO_NAME = "demo-token-rm"  # the name the server reports for it


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
    """The cached checkpoint of `preset_name`, built first if this recipe has none yet."""
    preset = PRESETS[preset_name]
    return cached_build(cache_dir or default_cache_dir(), f"{preset_name}-{recipe_key(preset)}",
                        lambda out: build_checkpoint(out, preset, progress))
