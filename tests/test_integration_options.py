"""The integrations' options (arguments over TOKENRM_* variables over defaults), the reductions,
and the alignment plan they share with PPO, on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from tokenrm.client import ItemScore
from tokenrm.client.alignment import plan
from tokenrm.core.reductions import reduce_rewards, token_summary
from tokenrm.integrations.options import DEFAULT_URL, Options
from tokenrm.integrations.trl import TokenRMReward


def test_arguments_win_over_the_environment_which_wins_over_defaults() -> None:
    env = {"TOKENRM_URL": "grpc://a:1, grpc://b:2", "TOKENRM_REDUCTION": "mean",
           "TOKENRM_DENSE": "0", "TOKENRM_TIMEOUT_S": "5"}
    o = Options.from_env(env)
    assert (o.urls, o.reduction, o.dense, o.timeout_s) == (("grpc://a:1", "grpc://b:2"), "mean",
                                                           False, 5.0)
    o = Options.from_env(env, urls="http://c:3", reduction="min", timeout_s=None)
    assert (o.urls, o.reduction, o.timeout_s) == (("http://c:3",), "min", 5.0)
    assert Options.from_env({}).urls == (DEFAULT_URL,)
    assert hash(Options.from_env(env)) == hash(Options.from_env(env))  # a key for shared clients


@pytest.mark.parametrize("env, message", [
    ({"TOKENRM_REDUCTION": "median"}, "reduction 'median'"),
    ({"TOKENRM_SEND": "bytes"}, "send 'bytes'"),
    ({"TOKENRM_DENSE": "maybe"}, "TOKENRM_DENSE='maybe'"),
    ({"TOKENRM_URL": "127.0.0.1:50051"}, "'127.0.0.1:50051': the URL must start with"),
    ({"TOKENRM_URL": "grpc://a:1,tcp://b:2"}, "'tcp://b:2': the URL must start with"),
])
def test_a_bad_option_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Options.from_env(env)


def test_a_bad_url_is_refused_when_the_integration_is_made_not_at_its_first_call() -> None:
    with pytest.raises(ValueError, match=r"'127\.0\.0\.1:50051': the URL must start with"):
        TokenRMReward("127.0.0.1:50051")


def test_reductions_and_summary() -> None:
    r = np.array([0.5, -1.0, 0.25], dtype=np.float32)
    assert [reduce_rewards(r, h) for h in ("total", "mean", "min", "last")] == \
        pytest.approx([-0.25, -0.25 / 3, -1.0, 0.25])
    assert reduce_rewards([], "mean") == 0.0
    assert token_summary(r) == {"tokenrm_min_token_reward": -1.0, "tokenrm_negative_tokens": 1.0,
                                "tokenrm_response_tokens": 3.0}
    with pytest.raises(ValueError, match="choose one of total, mean, min, last"):
        reduce_rewards(r, "sum")


class Chars:
    """A tokenizer of one character per id (id = code point); EOS is 0."""

    eos_token_id = 0

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_a_plan_sends_ids_or_spans_and_places_rewards_on_policy_tokens() -> None:
    prompts, prompt_ids = ["p", "q"], [[7], [8]]
    responses = [[ord("a"), ord("b"), 0], [0]]  # the second says nothing but EOS
    by_ids = plan(Chars(), prompts, prompt_ids, responses, by_ids=True)
    assert [(i.prompt_ids, i.response_ids) for i in by_ids.items] == [([7], [97, 98])]
    score = ItemScore(np.array([0.5, -1.0], np.float32), np.array([97, 98]), None, None, None,
                      -0.5)
    placed = by_ids.place([score], by_ids=True)
    np.testing.assert_array_equal(placed[0], [0.5, -1.0, 0.0])  # EOS gets 0
    np.testing.assert_array_equal(placed[1], [0.0])
    by_text = plan(Chars(), prompts, prompt_ids, responses, by_ids=False)
    assert [(i.prompt, i.response, i.spans) for i in by_text.items] == \
        [("p", "ab", [(0, 1), (1, 2)])]
    spans = ItemScore(np.array([0.1], np.float32), np.array([5]), None, None,
                      np.array([0.25, 0.75], np.float32), 1.0)
    np.testing.assert_array_equal(by_text.place([spans], by_ids=False)[0], [0.25, 0.75, 0.0])
