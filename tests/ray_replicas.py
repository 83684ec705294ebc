"""List, or kill one of, the Serve replicas of the local Ray: run as a subprocess, so that the
test process itself never joins Ray. Prints the live replicas' actor names, one per line.

    python tests/ray_replicas.py [--kill]
"""

from __future__ import annotations

import sys

import ray


def main() -> None:
    ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith("SERVE_REPLICA::tokenrm#"))
    if "--kill" in sys.argv[1:]:
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    print("\n".join(names))


if __name__ == "__main__":
    main()
