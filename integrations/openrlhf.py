"""OpenRLHF's `reward_func` file: `--reward.remote_url "$(python -m tokenrm.integrations.openrlhf)"`
(the command prints this file's path; OpenRLHF loads a URL ending in .py as a reward function).

What it gives over `--reward.remote_url http://host:8000/get_reward`: gRPC, several servers
(TOKENRM_URL=grpc://a:50051,grpc://b:50051), API keys (TOKENRM_API_KEY; OpenRLHF's own HTTP
client sends none), and retries that follow the server's hint within TOKENRM_TIMEOUT_S, where
OpenRLHF's client tries 5 times 1 s apart. TOKENRM_REDUCTION picks the one reward per response
(total, mean, min, last). OpenRLHF calls it from many threads at once, one query each: the
calls share one client, and the server batches them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenrm.client import Item, RewardClient
from tokenrm.core.queries import split_query
from tokenrm.core.reductions import reduce_rewards, token_summary
from tokenrm.integrations.options import Options

_lock = threading.Lock()
_shared: dict[Options, RewardClient] = {}


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any],
                **kwargs: Any) -> dict[str, Any]:
    """{"rewards": (B,), "scores": (B,), "extra_logs": {name: (B,)}} as torch tensors."""
    import torch  # OpenRLHF's environment has it; the module itself does not need it

    options = Options.from_env()
    items = []
    for i, (query, prompt) in enumerate(zip(queries, prompts, strict=True)):
        split = split_query(query, prompt)
        if split is None:
            raise ValueError(f"tokenrm: queries[{i}] does not hold prompts[{i}] (neither whole "
                             "near its start nor the tail of a prompt cut from the left)")
        items.append(Item.text(split.prompt, split.response))
    token_rewards = [s.rewards for s in _client(options).score(items)]
    rewards = torch.tensor([reduce_rewards(r, options.reduction) for r in token_rewards])
    summaries = [token_summary(r) for r in token_rewards]
    return {"rewards": rewards, "scores": rewards,
            "extra_logs": {k: torch.tensor([s[k] for s in summaries])
                           for k in (summaries[0] if summaries else {})}}


def _client(options: Options) -> RewardClient:
    with _lock:
        if options not in _shared:
            _shared[options] = RewardClient(list(options.urls), api_key=options.api_key,
                                            timeout_s=options.timeout_s)
        return _shared[options]


if __name__ == "__main__":
    print(Path(__file__).resolve())
