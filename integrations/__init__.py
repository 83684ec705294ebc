"""tokenrm.integrations: tokenrm as the reward backend of the trainers people use.

- `openrlhf`: a `reward_func` file for `--reward.remote_url /path/to/openrlhf.py` (the server's
  own `POST /get_reward` serves `--reward.remote_url http://host:8000/get_reward` too);
- `verl`: `TokenRMRewardManager`, dense per-token rewards aligned to the policy's tokens;
- `trl`: `TokenRMReward`, an async reward function for GRPOTrainer and RLOOTrainer.

Each is its own module, so a trainer's package is imported only with its module (verl's manager
subclasses verl's base class: importing it needs verl); all go through tokenrm.client and read
their defaults from TOKENRM_* environment variables (`options.Options`).
"""
