"""PPO's prompt sources: the synthetic task's and a user's JSONL file (order, cycling, errors
with path:line, rebuilding from config.json), and `tokenrm ppo`'s defaults read from the
dataclasses."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from tokenrm.cli.main import _parser
from tokenrm.cli.ppo import (
    CONFIG_FLAGS,
    CONNECTION_FLAGS,
    DEFAULT_SERVER,
    EXPERIMENT_FLAGS,
    SAMPLING_FLAGS,
    _connection,
    _given,
    _ppo_config,
)
from tokenrm.training.data import DataError
from tokenrm.training.ppo.experiment import Experiment
from tokenrm.training.ppo.prompts import FilePrompts, SyntheticPrompts, describe_source, rebuild
from tokenrm.training.ppo.rollout import Sampling
from tokenrm.training.ppo.run import Connection
from tokenrm.training.ppo.trainer import PPOConfig

PROMPTS = [f"Question {i}: what is {i} + {i}?" for i in range(6)]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    return write(tmp_path / "prompts.jsonl", [json.dumps({"prompt": p}) for p in PROMPTS])


# ---------------------------------------------------------------- the synthetic task's


@pytest.mark.parametrize(("seed", "digest"), [
    (3, "4a39568aad0dda727e4a0a4db60b9af9942f01e1f7f9da77d95ee3e69a13762e"),
    (100, "292fe8913e1fd2db7ad23b9825959d41c52a379b5f120c287c6a9cc7979edf65"),
])
def test_synthetic_prompts_are_the_ones_runs_were_trained_on(seed: int, digest: str) -> None:
    """The digests of trainer.training_prompts(seed, i, 16) for i < 3, before prompt sources:
    earlier results (the experiment's, with prompt seeds 100+) stay comparable."""
    source = SyntheticPrompts(seed)
    prompts = [p for i in range(3) for p in source.prompts(i, 16)]
    assert hashlib.sha256("\n".join(prompts).encode()).hexdigest() == digest
    assert source.spec() == {"kind": "synthetic", "seed": seed}


# ---------------------------------------------------------------- a prompt file


def test_file_prompts_depend_on_the_seed_and_iteration_alone(prompt_file: Path) -> None:
    source = FilePrompts.load(prompt_file, 3)
    later = source.prompts(7, 4)  # asked first: no state carries from one call to the next
    again = FilePrompts.load(prompt_file, 3)
    assert [again.prompts(i, 4) for i in range(8)][7] == later
    assert source.prompts(0, 4) == again.prompts(0, 4)
    assert [FilePrompts.load(prompt_file, 4).prompts(i, 3) for i in range(4)] != \
        [source.prompts(i, 3) for i in range(4)]
    assert source.spec() == {"kind": "file", "path": str(prompt_file.absolute()), "seed": 3,
                             "sha256": hashlib.sha256(prompt_file.read_bytes()).hexdigest()}


def test_file_prompts_use_every_prompt_before_any_repeats(prompt_file: Path) -> None:
    source = FilePrompts.load(prompt_file, 0)
    drawn = [p for i in range(8) for p in source.prompts(i, 3)]  # 4 passes over 6 prompts
    passes = [drawn[k:k + 6] for k in range(0, 24, 6)]
    for one_pass in passes:
        assert sorted(one_pass) == sorted(PROMPTS)
    assert len({tuple(p) for p in passes}) > 1  # each pass is shuffled anew
    # More prompts per iteration than the file holds: it cycles within the iteration.
    assert sorted(source.prompts(0, 12)) == sorted(PROMPTS * 2)


def test_file_prompts_skip_blank_lines_and_keep_other_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", ['{"prompt": "a", "id": 1}', "", "  ",
                                        '{"prompt": "b\u2028c"}'])
    assert sorted(FilePrompts.load(path, 0).prompts(0, 2)) == ["a", "b\u2028c"]


@pytest.mark.parametrize(("lines", "where", "reason"), [
    (['{"prompt": "ok"}', "{not json"], 2, "invalid JSON"),
    (['{"prompt": "ok"}', "", '["a list"]'], 3, "expected a JSON object, got an array"),
    (['{"question": "no prompt"}'], 1, "missing field 'prompt'"),
    (['{"prompt": 7}'], 1, "field 'prompt' must be a string, got a number"),
    (['{"prompt": null}'], 1, "field 'prompt' must be a string, got null"),
    (['{"prompt": "ok"}', '{"prompt": "  "}'], 2, "field 'prompt' is empty"),
])
def test_a_malformed_line_stops_the_load_with_path_and_line(
        tmp_path: Path, lines: list[str], where: int, reason: str) -> None:
    path = write(tmp_path / "p.jsonl", lines)
    with pytest.raises(DataError) as err:
        FilePrompts.load(path, 0)
    assert str(err.value).startswith(f"{path.absolute()}:{where}: {reason}"), str(err.value)


def test_an_empty_missing_or_unreadable_file_stops_the_load(tmp_path: Path) -> None:
    for empty in ([], ["", "   "]):
        path = write(tmp_path / "empty.jsonl", empty)
        with pytest.raises(DataError, match=r"empty\.jsonl: no prompts \(the file is empty\)"):
            FilePrompts.load(path, 0)
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl: no such prompt file"):
        FilePrompts.load(missing, 0)
    with pytest.raises(DataError, match="cannot read the prompt file"):
        FilePrompts.load(tmp_path, 0)  # a directory
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "Köln"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.jsonl: not UTF-8 text"):
        FilePrompts.load(latin, 0)


# ---------------------------------------------------------------- rebuilding on --resume


def test_rebuild_gives_the_recorded_source(prompt_file: Path) -> None:
    assert rebuild(None, 5).spec() == {"kind": "synthetic", "seed": 5}  # a run from before
    assert rebuild({"kind": "synthetic", "seed": 7}, 5).prompts(2, 4) == \
        SyntheticPrompts(7).prompts(2, 4)
    source = FilePrompts.load(prompt_file, 3)
    again = rebuild(source.spec(), 5)
    assert again.spec() == source.spec()
    assert again.prompts(4, 5) == source.prompts(4, 5)
    with pytest.raises(ValueError, match="unknown prompt source 'web'"):
        rebuild({"kind": "web", "seed": 3}, 3)


def test_rebuild_refuses_a_prompt_file_that_is_gone_or_changed(prompt_file: Path) -> None:
    spec = FilePrompts.load(prompt_file, 3).spec()
    write(prompt_file, [json.dumps({"prompt": p}) for p in reversed(PROMPTS)])
    with pytest.raises(DataError, match="changed since the run began"):
        rebuild(spec, 3)
    prompt_file.unlink()
    with pytest.raises(FileNotFoundError) as err:
        rebuild(spec, 3)
    assert str(err.value).startswith(f"{prompt_file.absolute()}: the run's prompt file")


def test_describe_source() -> None:
    assert describe_source({"kind": "synthetic", "seed": 3}) == \
        "the synthetic task's prompts (seed 3)"
    assert describe_source({"kind": "file", "path": "/p.jsonl", "seed": 1}) == \
        "the prompt file /p.jsonl (seed 1)"


# ---------------------------------------------------------------- the CLI's defaults


def test_the_cli_defaults_are_the_dataclasses_defaults() -> None:
    args = _parser().parse_args(["ppo", "--out", "x"])
    assert _ppo_config(args) == PPOConfig()
    assert _connection(args) == Connection([DEFAULT_SERVER])
    assert args.prompt_file is None
    args = _parser().parse_args(["experiment", "fine-vs-seq", "--out", "x"])
    assert _ppo_config(args) == PPOConfig()
    assert Experiment(_ppo_config(args), **_given(args, EXPERIMENT_FLAGS)) == \
        Experiment(PPOConfig())
    assert PPOConfig().iterations == 60  # both commands' default, as before


def test_cli_flags_set_the_fields_they_name(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "Who is Ana?"}\n')
    for flags, cls in ((CONFIG_FLAGS, PPOConfig), (SAMPLING_FLAGS, Sampling),
                       (CONNECTION_FLAGS, Connection), (EXPERIMENT_FLAGS, Experiment)):
        assert set(flags.values()) <= {f.name for f in fields(cls)}, cls
    args = _parser().parse_args(["ppo", "--out", "x", "--iterations", "5", "--prompts", "3",
                                 "--temperature", "0.7", "--mode", "seq", "--kl-target", "2",
                                 "--timeout", "9", "--prompt-file", str(tmp_path / "p.jsonl")])
    config = _ppo_config(args)
    assert (config.iterations, config.prompts_per_iteration, config.mode, config.kl_target) == \
        (5, 3, "seq", 2.0)
    assert config.sampling == Sampling(temperature=0.7)
    assert _connection(args).timeout_s == 9.0
    assert args.prompt_file == tmp_path / "p.jsonl"


def test_building_the_parser_imports_no_torch() -> None:
    code = ("import sys; from tokenrm.cli.main import _parser; _parser(); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "False"
