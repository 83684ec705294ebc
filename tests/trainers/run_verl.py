"""Run in verl's own venv: generate with a tiny policy, build the DataProto as verl does (prompts
left-padded, responses right-padded, one attention mask), score it with TokenRMRewardManager
through both of verl's interfaces, and print what came back as JSON.

    python run_verl.py POLICY_DIR PROMPTS_JSON   (TOKENRM_URL names the server)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl import DataProto
from verl.trainer.ppo.reward import load_reward_manager  # how verl itself builds it

PROMPT_LEN, RESPONSE_LEN = 24, 12


def batch(policy_dir: str, prompts: list[str]) -> tuple[DataProto, AutoTokenizer]:
    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    pad = tok.pad_token_id
    rows, outs = [], []
    torch.manual_seed(0)
    for text in prompts:
        ids = tok(text)["input_ids"][-PROMPT_LEN:]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=RESPONSE_LEN, do_sample=True,
                                 pad_token_id=pad, eos_token_id=tok.eos_token_id)
        rows.append(ids)
        outs.append(out[0, len(ids):].tolist())
    prompts_t = torch.full((len(rows), PROMPT_LEN), pad)
    responses_t = torch.full((len(rows), RESPONSE_LEN), pad)
    mask = torch.zeros((len(rows), PROMPT_LEN + RESPONSE_LEN), dtype=torch.long)
    for i, (p, r) in enumerate(zip(rows, outs, strict=True)):
        if tok.eos_token_id in r:  # generation stops at EOS; verl pads after it
            r = r[:r.index(tok.eos_token_id) + 1]
        prompts_t[i, PROMPT_LEN - len(p):] = torch.tensor(p)
        responses_t[i, :len(r)] = torch.tensor(r)
        mask[i, PROMPT_LEN - len(p):PROMPT_LEN + len(r)] = 1
    data = DataProto.from_dict({"prompts": prompts_t, "responses": responses_t,
                                "attention_mask": mask,
                                "input_ids": torch.cat([prompts_t, responses_t], dim=1)})
    return data, tok


def main() -> None:
    policy_dir, prompts_file = sys.argv[1:3]
    data, tok = batch(policy_dir, json.loads(Path(prompts_file).read_text()))
    from omegaconf import OmegaConf

    config = OmegaConf.create({"reward": {
        "custom_reward_function": {"path": None, "name": "compute_score"},
        "reward_manager": {"source": "importlib", "name": "TokenRMRewardManager",
                           "module": {"path": "pkg://tokenrm.integrations.verl",
                                      "name": "custom_reward_manager"}}}})
    manager = load_reward_manager(config, tok)
    legacy = manager(data, return_dict=True)

    async def current() -> list:
        return [await manager.run_single(data[i:i + 1]) for i in range(len(data))]

    import asyncio

    singles = asyncio.run(current())
    totals_only = type(manager)(config=config, tokenizer=tok, dense=False)(data)
    assembled = type(manager).assemble_rm_scores(data, [s["reward_score"] for s in singles])
    print(json.dumps({
        "manager": type(manager).__name__,
        "prompts": [data.batch["prompts"][i].tolist() for i in range(len(data))],
        "responses": data.batch["responses"].tolist(),
        "attention_mask": data.batch["attention_mask"].tolist(),
        "legacy": legacy["reward_tensor"].tolist(),
        "legacy_extra": legacy["reward_extra_info"],
        "current": assembled.tolist(),
        "totals_only": totals_only.tolist(),
        "current_extra": [s["reward_extra_info"] for s in singles]}))


if __name__ == "__main__":
    main()
