"""Run in TRL's own venv: two GRPOTrainer steps of a tiny policy on CPU with TokenRMReward as its
reward function (no vLLM); print what the function returned and what TRL logged, as JSON.

    python run_trl.py POLICY_DIR PROMPTS_JSON OUT_DIR   (TOKENRM_URL names the server)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from tokenrm.integrations.trl import TokenRMReward


def main() -> None:
    policy_dir, prompts_file, out_dir = sys.argv[1:4]
    tok = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    calls: list[dict[str, Any]] = []

    class Recorded(TokenRMReward):  # TokenRMReward as TRL sees it, with what it returned kept
        async def __call__(self, prompts: Any, completions: Any,
                           completion_ids: Any = None, **kwargs: Any) -> list[float | None]:
            values = await super().__call__(prompts, completions, completion_ids, **kwargs)
            calls.append({"prompts": prompts, "completion_ids": completion_ids,
                          "rewards": values})
            return values

    reward = Recorded(tokenizer=tok)
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=8, max_steps=2, use_cpu=True, bf16=False,
                      report_to="none", logging_steps=1, save_strategy="no",
                      gradient_checkpointing=False, seed=0)
    trainer = GRPOTrainer(model=policy_dir, reward_funcs=[reward], args=args,
                          train_dataset=Dataset.from_dict({"prompt": json.loads(
                              Path(prompts_file).read_text())}), processing_class=tok)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/tokenrm/mean" in h]
    print(json.dumps({"name": reward.__name__, "calls": calls,
                      "logged_means": [h["rewards/tokenrm/mean"] for h in logged]}))


if __name__ == "__main__":
    main()
