"""Prometheus metrics, in one registry per server: the engine's batches and the requests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKENS = (64, 256, 1024, 4096, 16384, 65536)
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class EngineMetrics:
    """Queue depth, batch shape, padding, forward time, throughput and refusals."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("tokenrm_queue_depth", "Rows waiting to be scored", registry=r)
        self.batch_size = Histogram("tokenrm_batch_size", "Rows per forward pass",
                                    buckets=_SIZES, registry=r)
        self.batch_tokens = Histogram("tokenrm_batch_tokens", "Real tokens per forward pass",
                                      buckets=_TOKENS, registry=r)
        self.padding_ratio = Histogram("tokenrm_padding_ratio",
                                       "Padded tokens / real tokens per forward pass",
                                       buckets=(1.0, 1.05, 1.1, 1.2, 1.5, 2, 3, 5), registry=r)
        self.forward_seconds = Histogram("tokenrm_forward_seconds", "Forward pass time",
                                         buckets=_SECONDS, registry=r)
        self.tokens = Counter("tokenrm_tokens", "Real tokens scored (rate: tokens/s)",
                              registry=r)
        self.padded_tokens = Counter("tokenrm_padded_tokens",
                                     "Tokens computed, padding included", registry=r)
        self.prompt_tokens_reused = Counter(
            "tokenrm_prompt_tokens_reused", "Prompt tokens computed once for several rows of a "
            "batch that share the prompt, counted for each row after the first", registry=r)
        self.refused = Counter("tokenrm_refused", "Requests refused because the queue was full",
                               registry=r)

    def observe_batch(self, rows: int, tokens: int, padded: int, seconds: float,
                      reused: int = 0) -> None:
        self.batch_size.observe(rows)
        self.batch_tokens.observe(tokens)
        self.padding_ratio.observe(padded / max(tokens, 1))
        self.forward_seconds.observe(seconds)
        self.tokens.inc(tokens)
        self.padded_tokens.inc(padded)
        self.prompt_tokens_reused.inc(reused)


class RequestMetrics:
    """Requests by transport and outcome ("ok" or an error code), and their latency."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("tokenrm_requests", "Requests by transport and outcome",
                                ["transport", "code"], registry=registry)
        self.request_seconds = Histogram("tokenrm_request_seconds", "Request latency",
                                         ["transport"], buckets=_SECONDS, registry=registry)

    def observe(self, transport: str, code: str, seconds: float | None = None) -> None:
        self.requests.labels(transport, code).inc()
        if seconds is not None:
            self.request_seconds.labels(transport).observe(seconds)
