"""POST /get_reward: OpenRLHF's remote reward protocol (`--reward.remote_url`), on the same
service, engine, limits, keys and errors as /score.

Each query is the policy's decoded prompt + response; the prompt is found in it (whole, or the
tail of a prompt cut from the left) and the rest is scored as the response. `rewards` holds one
scalar per query, reduced from its token rewards (`?reduction=total|mean|min|last`, default
TOKENRM_GET_REWARD_REDUCTION); the token rewards come along in `token_rewards`.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from tokenrm.core.queries import split_query
from tokenrm.core.reductions import REDUCTIONS, reduce_rewards, token_summary
from tokenrm.server import http_common as web
from tokenrm.server import http_schema as schema
from tokenrm.server.errors import InvalidInput
from tokenrm.server.items import ScoreItem
from tokenrm.server.service import ScoreAnswer, ScoreRequest

router = APIRouter()

# The body and ?reduction= are read by the route itself (a wrong value gets the usual error
# body); OpenAPI is told what they may be.
OPENAPI = {
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/GetRewardRequest"}}}},
    "parameters": [{
        "name": "reduction", "in": "query", "required": False,
        "description": "how each response's token rewards become its one reward; default: "
                       "TOKENRM_GET_REWARD_REDUCTION",
        "schema": {"type": "string", "enum": list(REDUCTIONS)}}]}


def request_from_json(body: bytes) -> ScoreRequest:
    parsed = web.parse(schema.GetRewardRequest, body)
    if len(parsed.prompts) != len(parsed.query):
        raise InvalidInput(f"prompts: {len(parsed.prompts)} prompts for {len(parsed.query)} "
                           "queries; give one prompt per query", field="prompts")
    items = []
    for i, (query, prompt) in enumerate(zip(parsed.query, parsed.prompts, strict=True)):
        split = split_query(query, prompt)
        if split is None:
            raise InvalidInput(f"query[{i}]: does not hold prompts[{i}] (neither whole near its "
                               "start nor the tail of a prompt cut from the left)",
                               item=i, field="query")
        items.append(ScoreItem(prompt=split.prompt, response=split.response))
    return ScoreRequest(items, allow_empty=True)


def answer_json(answer: ScoreAnswer, reduction: str) -> Response:
    token_rewards = [r.rewards for r in answer.results]
    rewards = [reduce_rewards(r, reduction) for r in token_rewards]
    summaries = [token_summary(r) for r in token_rewards]
    logs = {k: [s[k] for s in summaries] for k in summaries[0]} if summaries else {}
    return web.json_response({"rewards": rewards, "scores": rewards, "extra_logs": logs,
                          "token_rewards": token_rewards, "model": answer.model,
                          "model_version": answer.model_version})


@router.post("/get_reward", response_model=schema.GetRewardResponse, responses=web.ERRORS,
             dependencies=[Depends(web.authorized)],
             summary="OpenRLHF's remote reward: one reward per query", openapi_extra=OPENAPI)
async def get_reward(request: Request, state: web.State) -> Response:
    how = request.query_params.get("reduction", state.settings.get_reward_reduction)
    if how not in REDUCTIONS:
        raise InvalidInput(f"reduction: {how!r} is not one of {', '.join(REDUCTIONS)}",
                           field="reduction")

    return await web.handle(request, state, "openrlhf", request_from_json,
                            lambda _r, a: answer_json(a, how))
