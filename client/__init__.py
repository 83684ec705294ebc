"""tokenrm.client: RewardClient, the trainer-side library for HTTP and gRPC."""
