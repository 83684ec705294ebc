"""Run in OpenRLHF's venv: OpenRLHF's own remote-reward client, unmodified, loaded from its
installed agent.py without the package's heavy imports (as OpenRLHF's own tests load it), against
a tokenrm server; print what it got back as JSON.

    python run_openrlhf.py REMOTE_URL CASES_JSON
REMOTE_URL: http://host:port/get_reward, or the path of tokenrm's reward_func file. CASES_JSON:
[{"query": ..., "prompt": ...}, ...]; every case is sent at once, one query per call.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import sys
import time
import types
from pathlib import Path


def executor_class() -> type:
    """SingleTurnAgentExecutor from the installed openrlhf/utils/agent.py."""
    spec = importlib.util.find_spec("openrlhf")
    assert spec is not None and spec.submodule_search_locations, "openrlhf is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "agent.py"
    sys.modules["openrlhf.utils.logging_utils"] = types.SimpleNamespace(
        init_logger=logging.getLogger)  # the one heavy-free import agent.py needs
    module_spec = importlib.util.spec_from_file_location("openrlhf_agent", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SingleTurnAgentExecutor


async def one(executor: object, case: dict) -> dict:
    started = time.monotonic()
    fetch = (executor._fetch_rewards_via_func if executor.reward_func  # type: ignore[attr-defined]
             else executor._fetch_rewards_via_http)  # type: ignore[attr-defined]
    try:
        [answer] = await fetch([case["query"]], [case["prompt"]], [None])
    except Exception as exc:  # what OpenRLHF's caller would catch and log
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - started}
    if not isinstance(answer, dict):
        return {"error": f"not a dict: {answer!r}"}
    plain = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in answer.items()}
    plain["extra_logs"] = {k: (v.tolist() if hasattr(v, "tolist") else v)
                           for k, v in (answer.get("extra_logs") or {}).items()}
    return {"answer": plain, "seconds": time.monotonic() - started}


async def main() -> None:
    url, cases_file = sys.argv[1:3]
    executor = executor_class()(remote_rm_url=[url])
    cases = json.loads(Path(cases_file).read_text())
    print(json.dumps(await asyncio.gather(*(one(executor, c) for c in cases))))


if __name__ == "__main__":
    asyncio.run(main())
