"""The shape of the code: folders import one way, modules and functions stay small.

Arrows (README, "How it is built"): cli -> server, client, training; server -> core, proto;
training -> core, client; client and integrations -> proto, client and the torch-free modules
of core; core and proto import nothing else of tokenrm. Imports are read with `ast`
(function-level ones too)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("cli", "client", "core", "demo", "integrations", "proto", "server", "training")
ALLOWED = {
    "cli": {"server", "client", "training", "core", "proto", "integrations", "demo"},
    "integrations": {"client", "core"},
    "server": {"core", "proto"},
    "training": {"core", "client", "demo"},
    "client": {"proto", "core"},
    "core": set(),
    "proto": set(),
    "demo": set(),   # where the shipped demo checkpoint is; nothing else
}
LIGHT = ("client", "integrations")  # installed beside a trainer with the light client only
HEAVY = {"torch", "transformers", "tokenizers", "safetensors", "accelerate"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 300, 60
GENERATED = {"reward_pb2.py", "reward_pb2_grpc.py"}


def imports(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.parent.relative_to(root).parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the folder's own tokenrm name
                base = ["tokenrm", *package[:len(package) - node.level + 1]]
                module = ".".join([*base, module]).rstrip(".")
            yield node.lineno, module
            # `from tokenrm.core import spans` imports the module tokenrm.core.spans
            yield from ((node.lineno, f"{module}.{a.name}") for a in node.names)


def folder_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "tokenrm" and len(parts) > 1 else None


def sources(root: Path, folder: str) -> list[Path]:
    return sorted(p for p in (root / folder).rglob("*.py") if p.name not in GENERATED)


def wrong_arrows(root: Path) -> list[str]:
    """Every import of one folder from another that the order does not allow; and every
    import by client/ of a core module that needs torch or transformers."""
    found: dict[str, str] = {}  # one per import line
    for folder in FOLDERS:
        for path in sources(root, folder):
            for line, module in imports(path, root):
                target = folder_of(module)
                where = f"{path.relative_to(root)}:{line}"
                if target is not None and target != folder and target not in ALLOWED[folder]:
                    found.setdefault(where, f"{where} imports {module}")
                elif folder in LIGHT and target == "core" and heavy(root, module):
                    found.setdefault(where, f"{where} imports {module} (needs torch or "
                                            "transformers)")
    return list(found.values())


def heavy(root: Path, module: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether importing this tokenrm.core module imports torch, transformers and the like."""
    inside = root.joinpath("core", *module.split(".")[2:])
    path = next((p for p in (inside.with_suffix(".py"), inside / "__init__.py") if p.is_file()),
                None)
    if module in seen or path is None:
        return False
    for _line, name in imports(path, root):
        if name.split(".")[0] in HEAVY:
            return True
        if folder_of(name) == "core" and heavy(root, name, seen | {module}):
            return True
    return False


def too_long(root: Path) -> list[str]:
    found = []
    for folder in FOLDERS:
        for path in sources(root, folder):
            text = path.read_text()
            if text.count("\n") > MAX_MODULE_LINES:
                found.append(f"{path.relative_to(root)}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: "
                                     f"{length} lines")
    return found


def test_folders_import_one_way() -> None:
    assert wrong_arrows(ROOT) == []


def test_no_library_module_or_function_is_too_long() -> None:
    assert too_long(ROOT) == []


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "core" / "light.py").write_text("import json\n")
    (tmp_path / "core" / "heavy.py").write_text("from tokenrm.core import light\nimport torch\n")
    (tmp_path / "core" / "indirect.py").write_text("from tokenrm.core.heavy import x\n")
    return tmp_path


def test_the_checks_find_what_they_look_for(tree: Path) -> None:
    (tree / "server" / "a.py").write_text("def f():\n    from tokenrm.training import synth\n")
    (tree / "client" / "b.py").write_text(
        "from tokenrm.core import light\nfrom tokenrm.core.indirect import y\n"
        "from tokenrm.server.app import z\n")
    (tree / "core" / "c.py").write_text("from . import light\nfrom ..client import d\n")
    (tree / "training" / "long.py").write_text(
        "def f():\n" + "    x = 1\n" * 60 + ("\n" * 240))
    assert wrong_arrows(tree) == [
        "client/b.py:2 imports tokenrm.core.indirect (needs torch or transformers)",
        "client/b.py:3 imports tokenrm.server.app",
        "core/c.py:2 imports tokenrm.client",
        "server/a.py:2 imports tokenrm.training",
    ]
    assert too_long(tree) == ["training/long.py: 301 lines", "training/long.py:1 f: 61 lines"]
