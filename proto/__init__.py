"""tokenrm.proto: the gRPC schema (tokenrm/v1/reward.proto) and its generated code."""
