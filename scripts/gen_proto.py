"""Generate the Python modules of the gRPC API from proto/tokenrm/v1/reward.proto.

    python scripts/gen_proto.py            # rewrite proto/reward_pb2{.py,.pyi,_grpc.py}
    python scripts/gen_proto.py --check    # exit 1 if they differ from what would be generated

grpcio-tools names its output after the .proto path (tokenrm/v1/reward_pb2.py) and the gRPC
module imports `from tokenrm.v1 import reward_pb2`. The proto/ folder is installed as the package
tokenrm.proto, so the modules go to the root of proto/, that one import is rewritten, and so is
the module name the message classes carry (pickle imports it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
SOURCE = "tokenrm/v1/reward.proto"
MODULES = ("reward_pb2.py", "reward_pb2.pyi", "reward_pb2_grpc.py")
HEADER = f"# Generated from proto/{SOURCE} by scripts/gen_proto.py. Do not edit.\n"


def generate() -> dict[str, str]:
    """The text of each generated module, by file name."""
    import grpc_tools
    from grpc_tools import protoc

    includes = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        status = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{includes}",
                              f"--python_out={tmp}", f"--pyi_out={tmp}",
                              f"--grpc_python_out={tmp}", SOURCE])
        if status != 0:
            raise RuntimeError(f"protoc failed on proto/{SOURCE} (exit {status})")
        out = Path(tmp) / Path(SOURCE).parent
        texts = {name: (out / name).read_text() for name in MODULES}
    texts["reward_pb2_grpc.py"] = texts["reward_pb2_grpc.py"].replace(
        "from tokenrm.v1 import reward_pb2 as", "from tokenrm.proto import reward_pb2 as")
    # The message classes' __module__: where pickle (e.g. Ray Serve's gRPC proxy) finds them.
    texts["reward_pb2.py"] = texts["reward_pb2.py"].replace(
        "'tokenrm.v1.reward_pb2'", "'tokenrm.proto.reward_pb2'")
    return {name: HEADER + text for name, text in texts.items()}


def stale() -> list[str]:
    """The generated modules that are missing or differ from what the .proto gives now."""
    return [name for name, text in generate().items()
            if not (PROTO_DIR / name).is_file() or (PROTO_DIR / name).read_text() != text]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale modules")
    args = parser.parse_args()
    if args.check:
        names = stale()
        if names:
            sys.exit(f"stale: {', '.join(names)}; run `make proto`")
        return
    for name, text in generate().items():
        (PROTO_DIR / name).write_text(text)
        print(f"wrote proto/{name}")


if __name__ == "__main__":
    main()
