"""Load and soak, the short CI version of `make soak` (bench/soak.py): the tiny checkpoint served
over HTTP and gRPC at once, ~10 s of an open loop at twice its measured capacity. Under that
overload every request must succeed with the rewards of the direct forward or be refused (429 /
RESOURCE_EXHAUSTED): no wrong rewards, no 5xx / INTERNAL / UNAVAILABLE, no hang past the
deadline, at most 0.5% of the accepted requests expired at their deadline; and the server's
memory must stay flat."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    """bench/soak.py as a module. bench/ is a folder of scripts, not a package: they import one
    another by bare name (`from load import ...`, `from wire import ...`), which works when run
    as `python bench/soak.py` because Python puts the script's folder first on sys.path. Here
    bench/ goes on sys.path just for the import (the modules stay in sys.modules after)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("soak")
    finally:
        sys.path.remove(str(BENCH))


def test_twice_the_capacity_is_served_or_refused_never_failed(soak: ModuleType,
                                                              tiny_checkpoint: Path) -> None:
    opts = soak.Options(duration_s=10.0, capacity_s=3.0, capacity_warmup_s=0.5, requests=100)
    result = soak.run(tiny_checkpoint, opts)
    report = soak.render(result)  # the whole table, shown when an assertion fails
    outcomes = result["soak"]["outcomes"]
    during = soak.totals(outcomes)
    measuring = soak.totals(result["capacity"]["outcomes"])
    for outcome in soak.MUST_BE_ZERO:  # wrong, server_error, timed_out, other
        assert during[outcome] + measuring[outcome] == 0, f"{outcome}\n{report}"
    # the overload was real: the server refused some requests, and served others on both
    # transports, with the rewards of the direct forward
    assert during["refused"] > 0, report
    for transport in soak.TRANSPORTS:
        assert outcomes[transport]["ok"] > 0, f"{transport}\n{report}"
        # admission refuses what could not finish in time: accepted work is scored
        accepted = outcomes[transport]["ok"] + outcomes[transport]["expired"]
        assert outcomes[transport]["expired"] <= opts.max_expired_share * accepted, report
        assert outcomes[transport]["max_abs_diff"] <= opts.tolerance, report
    assert during["refused_without_hint"] == 0, report  # 429 Retry-After, retry-after-ms
    assert result["rss"]["flat"], report
    assert result["passed"], report
