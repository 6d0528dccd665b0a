"""The node's secure-aggregation and distributed-DP decisions (:mod:`fedgov.node.secure`), without Flower."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fedgov.errors import PrivacyError, SecAggError
from fedgov.node.rounds import DPState
from fedgov.node.secure import (
    Identity,
    StageRequest,
    check_distributed,
    mask_update,
    receive_shares,
    run_stage,
    secagg_graph_key,
    secagg_key,
)
from fedgov.privacy.distributed import DistributedPlan, plan_distributed
from fedgov.privacy.secagg import SecAggParams, encode_update


class _State:
    """An in-memory :class:`fedgov.node.secure.RunState`."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self.texts.get(key)

    def put(self, key: str, text: str) -> None:
        self.texts[key] = text


class _Unmasked:
    """A stand-in for the node's keys: "masks" by returning the encoded vector as it is."""

    def mask(self, y: np.ndarray, survivors: list[int]) -> np.ndarray:
        return y


UNMASKED: Any = _Unmasked()


@pytest.fixture(scope="module")
def plan() -> DistributedPlan:
    return plan_distributed(dimension=20, clip=1.0, rounds=3, sample_rate=0.5, target_epsilon=8.0, delta=1e-5, accountant="rdp")


def _task(dropout: float = 0.0) -> Any:
    return SimpleNamespace(privacy=SimpleNamespace(mode="distributed", dropout_tolerance=dropout))


def test_the_graph_is_seeded_by_what_the_task_asks_within_its_rounds() -> None:
    assert secagg_graph_key(kind="task", fingerprint="f", server_round=3, rounds=3) == "task-f"
    assert secagg_graph_key(kind="query", fingerprint="q", server_round=1) == "query-q"
    with pytest.raises(SecAggError, match="not one of the task's 3 rounds"):
        secagg_graph_key(kind="task", fingerprint="f", server_round=4, rounds=3)
    with pytest.raises(SecAggError, match="one round"):
        secagg_graph_key(kind="query", fingerprint="q", server_round=2)


def test_the_keys_of_two_tasks_never_share_a_state() -> None:
    assert secagg_key("task-a") != secagg_key("task-b")
    assert len(secagg_key("x")) == len("fedgov-secagg-") + 64


def test_an_unknown_stage_or_missing_keys_stop_the_round() -> None:
    nothing: Any = None  # never reached: the stage or the state stops the round first
    me = Identity("GM0363", key=None, roster=nothing, home=nothing)
    with pytest.raises(SecAggError, match="unknown stage"):
        run_stage(StageRequest("gossip", 1, "t"), me, state=_State(), node_id=1, params=SecAggParams())
    with pytest.raises(SecAggError, match="keys stage did not reach"):
        run_stage(StageRequest("shares", 1, "t"), me, state=_State(), node_id=1, params=SecAggParams())
    with pytest.raises(SecAggError, match="keys stage did not reach"):
        receive_shares(_State(), round_key="t", server_round=1, node_id=1, ciphertexts={}, nodes=[1])


def test_distributed_dp_needs_the_nodes_own_plan_and_honest_contributors(plan: DistributedPlan) -> None:
    dp = DPState(history=[], plan_json=plan.model_dump_json())
    z, scale = plan.noise_multiplier, plan.scale
    assert check_distributed(dp, _task(), z=z, scale=scale, min_contributors=4, survivors=4) == (plan, 4)
    with pytest.raises(PrivacyError, match="no distributed-DP plan"):
        check_distributed(None, _task(), z=z, scale=scale, min_contributors=4, survivors=4)
    with pytest.raises(PrivacyError, match="are not this node's"):
        check_distributed(dp, _task(), z=z * 0.9, scale=scale, min_contributors=4, survivors=4)
    with pytest.raises(PrivacyError, match="between 1 and the round's 4 nodes"):
        check_distributed(dp, _task(), z=z, scale=scale, min_contributors=5, survivors=4)
    # the task lets a quarter drop out: 3 of 4 is its own minimum, 2 is below it
    assert check_distributed(dp, _task(0.25), z=z, scale=scale, min_contributors=3, survivors=4)[1] == 3
    with pytest.raises(PrivacyError, match="below the task's own 3"):
        check_distributed(dp, _task(0.25), z=z, scale=scale, min_contributors=2, survivors=4)


def test_a_plain_update_is_weighed_by_its_capped_row_count() -> None:
    update = [np.full(4, 0.5), np.full(2, -0.25)]
    params = SecAggParams()
    y = mask_update(UNMASKED, update, survivors=[1, 2], params=params, distributed=None,
                    metrics={"num-examples": 5000.0}, weight_cap=1000.0)
    assert np.array_equal(y, encode_update(update, 1.0, params))
    y = mask_update(UNMASKED, update, survivors=[1, 2], params=params, distributed=None,
                    metrics={"num-examples": 250.0}, weight_cap=1000.0)
    assert np.array_equal(y, encode_update(update, 0.25, params))


def test_the_sampling_coin_is_the_nodes_own_and_flipped_only_below_rate_one(plan: DistributedPlan) -> None:
    flips: list[float] = []

    def coin(rate: float) -> bool:
        flips.append(rate)
        return False

    update = [np.full(plan.dimension, 0.01)]
    mask_update(UNMASKED, update, survivors=[1, 2, 3], params=SecAggParams(), distributed=(plan, 3),
                metrics={}, weight_cap=1.0, coin=coin)
    assert flips == [0.5]
    always = plan.model_copy(update={"sample_rate": 1.0})
    mask_update(UNMASKED, update, survivors=[1, 2, 3], params=SecAggParams(), distributed=(always, 3),
                metrics={}, weight_cap=1.0, coin=coin)
    assert flips == [0.5]
