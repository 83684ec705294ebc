"""LiveState, without Ray: the served checkpoint replaced while 8 callers keep asking; no
request fails, answers move from the old version to the new, the old engine closes once its
last request is answered; a checkpoint that does not load leaves the old one serving."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tokenrm.server.app import create_app
from tokenrm.server.model import ModelLoadError
from tokenrm.server.settings import Settings

ITEM = {"prompt": "Where does Ana live?", "response": "Ana lives in Lima."}


async def _serving_under_load(settings: Settings, change: Any) -> list[tuple]:
    """Run the app, keep 8 callers asking, `await change(live)` meanwhile; the answers as
    (status, version, rewards) in the order they came."""
    app = create_app(settings)
    answers: list[tuple] = []
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        done = asyncio.Event()

        async def caller() -> None:
            while not done.is_set():
                r = await client.post("/score", json={"items": [ITEM]})
                body = r.json()
                answers.append((r.status_code, body.get("model_version"),
                                body["results"][0]["rewards"] if r.status_code == 200 else None))

        callers = [asyncio.create_task(caller()) for _ in range(8)]
        await asyncio.sleep(0.3)
        try:
            await change(app.state.live)
        finally:
            await asyncio.sleep(0.3)
            done.set()
            await asyncio.gather(*callers)
    return answers


def test_a_replacement_under_load_fails_no_request(tiny_checkpoint: Path,
                                                  other_checkpoint: Path) -> None:
    settings = Settings(model=tiny_checkpoint, model_version="a", trace=False)

    async def replace(live: Any) -> None:
        old = live.state
        await live.replace(settings.model_copy(update={"model": other_checkpoint,
                                                       "model_version": "b"}))
        # replace returns once the old engine has answered its last request and closed
        assert old.service.in_flight == 0 and not old.service.ready
        assert live.state.service.ready

    answers = asyncio.run(_serving_under_load(settings, replace))
    assert {status for status, _, _ in answers} == {200}
    versions = [v for _, v, _ in answers]
    assert versions[0] == "a" and versions[-1] == "b" and set(versions) == {"a", "b"}
    last_a = max(i for i, v in enumerate(versions) if v == "a")
    assert all(v == "b" for v in versions[last_a + 1:]) and last_a < len(versions) - 8
    rewards = {v: r for _, v, r in answers}
    assert not np.allclose(rewards["a"], rewards["b"], atol=1e-3)


def test_a_checkpoint_that_does_not_load_leaves_the_old_one_serving(tiny_checkpoint: Path,
                                                                   tmp_path: Path) -> None:
    settings = Settings(model=tiny_checkpoint, model_version="a", trace=False)

    async def replace(live: Any) -> None:
        with pytest.raises(ModelLoadError, match="not a checkpoint directory"):
            await live.replace(settings.model_copy(update={"model": tmp_path}))
        assert live.state.settings.model == tiny_checkpoint and live.state.service.ready

    answers = asyncio.run(_serving_under_load(settings, replace))
    assert {(status, version) for status, version, _ in answers} == {(200, "a")}
