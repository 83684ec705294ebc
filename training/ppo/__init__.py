"""Fine-grained PPO against a running tokenrm server."""
