"""The gRPC modules in proto/ are exactly what scripts/gen_proto.py makes from the .proto."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gen_proto.py"


@pytest.fixture(scope="module")
def gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_modules_are_not_stale(gen_proto: ModuleType) -> None:
    assert gen_proto.stale() == [], "run `make proto` and commit the result"


def test_an_edited_proto_is_caught(gen_proto: ModuleType, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "proto"
    shutil.copytree(gen_proto.PROTO_DIR, copy)
    source = copy / gen_proto.SOURCE
    source.write_text(source.read_text().replace(
        "message Usage {", "message Usage {\n  // A new field nobody regenerated for.\n"
        "  int64 cached_tokens = 3;"))
    monkeypatch.setattr(gen_proto, "PROTO_DIR", copy)
    assert set(gen_proto.stale()) == {"reward_pb2.py", "reward_pb2.pyi"}
