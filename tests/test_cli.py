"""The `tokenrm` command: synth, train-rm and eval-rm chained as a user would, plus bad input."""

import json
import socket
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaForTokenClassification

from tokenrm.cli.extras import advice
from tokenrm.cli.main import main
from tokenrm.integrations.options import Options
from tokenrm.server.launcher import free_port
from tokenrm.server.settings import CLIENT_VARIABLES, misread_variables
from tokenrm.training.data import load_pairs


def test_synth_writes_held_out_pairs_deterministically(tmp_path: Path, capsys) -> None:
    assert main(["synth", "--out", str(tmp_path / "a"), "--n", "50", "--seed", "3"]) == 0
    assert main(["synth", "--out", str(tmp_path / "b"), "--n", "50", "--seed", "3"]) == 0
    assert "45 training and 5 held-out pairs" in capsys.readouterr().out
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train = {p.prompt for p in load_pairs(tmp_path / "a" / "train.jsonl")}
    held_out = {p.prompt for p in load_pairs(tmp_path / "a" / "eval.jsonl")}
    assert not train & held_out


def test_eval_rm_prints_metrics_json(tiny_checkpoint: Path, data_dir: Path, capsys) -> None:
    assert main(["eval-rm", "--model", str(tiny_checkpoint),
                 "--data", str(data_dir / "eval.jsonl")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["pairs"] == 40
    assert 0.0 <= metrics["token_auroc"] <= 1.0
    assert 0.0 <= metrics["pairwise_accuracy"] <= 1.0


def test_malformed_data_is_a_clear_error_not_a_traceback(tiny_checkpoint: Path,
                                                         tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "rejected": "a", "edited": "b"}\n{"prompt": "p"}\n')
    run = subprocess.run(
        [sys.executable, "-m", "tokenrm.cli.main", "eval-rm", "--model", str(tiny_checkpoint),
         "--data", str(bad)], capture_output=True, text=True, check=False)
    assert run.returncode == 2
    assert f"{bad}:2: missing field 'rejected'" in run.stderr
    assert "Traceback" not in run.stderr


def test_train_rm_from_the_command_line(data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ckpt"
    assert main(["train-rm", "--data", str(data_dir), "--out", str(out), "--preset", "tiny",
                 "--threads", "1", "--grad-accum", "2"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex('{\n  "checkpoint"'):])
    assert summary["checkpoint"] == str(out) and summary["pairs"] == 40
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] > 0


def test_invalid_server_settings_are_one_line_each_not_a_traceback() -> None:
    env = {"TOKENRM_API_KEYS": " , ", "TOKENRM_MAX_QUEUE_ITEMS": "lots", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "tokenrm.cli.main", "serve"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("tokenrm serve: invalid settings: ")
    # A key list with no key would otherwise serve without authentication.
    assert "TOKENRM_API_KEYS: set, but holds no key" in line
    assert "TOKENRM_MAX_QUEUE_ITEMS: Input should be a valid integer" in line


def test_variables_the_server_would_ignore_by_mistake_are_named() -> None:
    env = {"TOKENRM_MAX_ITEMS": "3", "TOKENRM_DTPYE": "float32", "TOKENRM_API_KEY": "k",
           "TOKENRM_URL": "grpc://h:1", "TOKENRM_TRAINER_VENVS": "1", "TOKENRM_DTYPE": "auto"}
    assert misread_variables(env) == [
        "TOKENRM_API_KEY is the clients' key; the server reads its keys from TOKENRM_API_KEYS, "
        "which is not set: every route is open",
        "TOKENRM_DTPYE is not a setting and is ignored: did you mean TOKENRM_DTYPE?",
        "TOKENRM_MAX_ITEMS is not a setting and is ignored: did you mean "
        "TOKENRM_MAX_ITEMS_PER_REQUEST or TOKENRM_MAX_WAIT_MS?"]
    assert misread_variables({"TOKENRM_API_KEY": "k", "TOKENRM_API_KEYS": "k"}) == []
    # The client side's variables are what the integrations read
    read = {"TOKENRM_URL"} | {f"TOKENRM_{f.name.upper()}" for f in fields(Options)
                              if f.name != "urls"}
    assert read == CLIENT_VARIABLES


@pytest.mark.parametrize("cls, labels", [(LlamaForSequenceClassification, 1),
                                         (LlamaForTokenClassification, 1),
                                         (LlamaForTokenClassification, 2)])
def test_eval_rm_takes_any_checkpoint_the_server_serves(tmp_path: Path, tokenizer, data_dir: Path,
                                                        capsys, cls, labels: int) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=len(tokenizer),
                         pad_token_id=tokenizer.pad_token_id, num_labels=labels)
    cls(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    assert main(["eval-rm", "--model", str(tmp_path / "rm"),
                 "--data", str(data_dir / "eval.jsonl")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["pairs"] == 40
    assert 0.0 <= metrics["pairwise_accuracy"] <= 1.0


@pytest.mark.parametrize("argv, flag, path, problem", [
    (["eval-rm", "--model", "{tmp}/nope", "--data", "{tmp}/pairs.jsonl"], "--model", "{tmp}/nope",
     "no such directory"),
    (["eval-rm", "--model", "{tmp}", "--data", "{tmp}/pairs.jsonl"], "--model", "{tmp}",
     "not a checkpoint directory (no config.json)"),
    (["eval-rm", "--model", "{ckpt}", "--data", "{tmp}"], "--data", "{tmp}", "not a file"),
    (["eval-rm", "--model", "{ckpt}", "--data", "{tmp}/nope.jsonl"], "--data",
     "{tmp}/nope.jsonl", "no such file"),
    (["train-rm", "--data", "{tmp}", "--out", "{tmp}/out"], "--data", "{tmp}",
     "no train.jsonl or eval.jsonl in it (tokenrm synth --out DIR writes both)"),
    (["train-rm", "--data", "{data}", "--out", "{tmp}/pairs.jsonl"], "--out",
     "{tmp}/pairs.jsonl", "exists and is not a directory"),
    (["train-rm", "--data", "{data}", "--out", "{tmp}/o", "--base", "{tmp}/nope"], "--base",
     "{tmp}/nope", "no such directory"),
    (["serve", "--model", "{tmp}/pairs.jsonl"], "--model", "{tmp}/pairs.jsonl",
     "not a directory"),
    (["ray-update", "--model", "{tmp}"], "--model", "{tmp}",
     "not a checkpoint directory (no config.json)"),
    (["ppo", "--out", "{tmp}/run", "--prompt-file", "{tmp}/nope.jsonl"], "--prompt-file",
     "{tmp}/nope.jsonl", "no such file"),
    (["ppo", "--out", "{tmp}/run", "--policy", "{tmp}"], "--policy", "{tmp}",
     "not a checkpoint directory (no config.json)"),
    (["synth", "--out", "{tmp}/pairs.jsonl"], "--out", "{tmp}/pairs.jsonl",
     "exists and is not a directory"),
])
def test_a_missing_or_wrong_path_is_one_line_naming_it(
        argv: list[str], flag: str, path: str, problem: str, tiny_checkpoint: Path,
        data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pairs.jsonl").write_text("")
    where = {"tmp": str(tmp_path), "ckpt": str(tiny_checkpoint), "data": str(data_dir)}
    with pytest.raises(SystemExit) as exited:
        main([arg.format(**where) for arg in argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"tokenrm {argv[0]}: error: argument {flag}: {path.format(**where)}: "
                   f"{problem}\n")


def test_a_command_whose_extra_is_missing_names_the_extra(tiny_checkpoint: Path, data_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys) -> None:
    """eval-rm without scikit-learn (an install of the [server] extra only, as in the
    container image) is one line naming what to install, not a traceback."""
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn fails as if absent
    monkeypatch.delitem(sys.modules, "sklearn.metrics", raising=False)
    assert main(["eval-rm", "--model", str(tiny_checkpoint),
                 "--data", str(data_dir / "eval.jsonl")]) == 2
    assert capsys.readouterr().err == ("tokenrm eval-rm: needs sklearn, which is not "
                                       "installed: pip install 'tokenrm[train]'\n")


def test_the_experiment_without_matplotlib_stops_before_its_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Its plot is drawn after hours of runs: the missing package is said before them."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "exp"
    assert main(["experiment", "fine-vs-seq", "--out", str(out), "--policy-recipe", "tiny"]) == 2
    assert capsys.readouterr().err == ("tokenrm experiment: needs matplotlib, which is not "
                                       "installed: pip install 'tokenrm[train]'\n")
    assert not out.exists() or not any(out.iterdir())


def test_advice_names_the_extra_of_a_package_that_is_not_installed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("accelerate", "ray"):
        monkeypatch.setitem(sys.modules, name, None)
    # transformers' own words when the Trainer is used without accelerate
    trainer = ImportError("Using the `Trainer` with `PyTorch` requires `accelerate>=1.1.0`: "
                          "Please run `pip install transformers[torch]`")
    assert advice(trainer, "ppo") == ("needs accelerate, which is not installed: "
                                      "pip install 'tokenrm[train]'")
    no_ray = ModuleNotFoundError("No module named 'ray'", name="ray")
    assert advice(no_ray, "serve") == ("needs ray, which is not installed: "
                                       "pip install 'tokenrm[ray]'")
    # an installed package's broken part, or a word that only contains a package's name, is a
    # bug to show as it is
    assert advice(ModuleNotFoundError("No module named 'torch._C'", name="torch._C"),
                  "serve") is None
    assert advice(ImportError("cannot import name 'array' from 'x'"), "serve") is None


def test_serving_and_ppo_import_nothing_of_the_train_extra() -> None:
    """The [server] extra serves and runs PPO against a server (the container image has only
    it): the modules of those commands import no package that only [train] brings."""
    code = ("import sys\n"
            "for m in ('sklearn', 'matplotlib', 'accelerate'): sys.modules[m] = None\n"
            "import tokenrm.cli.main, tokenrm.server.app, tokenrm.server.ray_app\n"
            "import tokenrm.training.demo, tokenrm.training.ppo.run\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr


def test_a_grpc_port_in_use_is_one_line_naming_it(tiny_checkpoint: Path) -> None:
    """Something listens on the gRPC port already: one line naming the port and its setting,
    exit 1, before the model loads (it was uvicorn's 50-line start-up traceback)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "tokenrm.cli.main", "serve", "--model",
                              str(tiny_checkpoint), "--port", str(free_port()),
                              "--grpc-port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"tokenrm serve: 127.0.0.1:{port} (TOKENRM_GRPC_PORT, --grpc-port): Address already "
        f"in use"), run.stderr
    assert "Traceback" not in run.stderr
