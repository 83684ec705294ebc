"""tokenrm.server: the scoring engine and its HTTP and gRPC adapters."""
