"""Model registry, seeded construction, Opacus compatibility and weight exchange."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedgov.config.task import ModelSpec
from fedgov.errors import ModelError
from fedgov.models import (
    ModelRegistry,
    available_models,
    build_model,
    dp_problems,
    get_state,
    make_dp_compatible,
    set_state,
)


def test_registry_holds_the_config_names() -> None:
    from fedgov.config.task import MODEL_NAMES

    assert set(MODEL_NAMES) <= set(available_models())


def test_own_registry_register_build_and_errors() -> None:
    reg = ModelRegistry()

    @reg.register("tiny")
    def tiny(spec: ModelSpec, *, n_features: int, n_classes: int) -> nn.Module:
        return nn.Linear(n_features, n_classes)

    assert reg.names() == ["tiny"]
    assert isinstance(reg.build("tiny", ModelSpec(), n_features=3, n_classes=2), nn.Linear)
    with pytest.raises(ModelError, match="already registered"):
        reg.register("tiny")(tiny)
    reg.register("tiny", replace=True)(tiny)
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        reg.build("nope", ModelSpec(), n_features=3, n_classes=2)
    with pytest.raises(ModelError, match="2 classes"):
        reg.build("tiny", ModelSpec(), n_features=3, n_classes=1)
    with pytest.raises(ModelError, match="1 input"):
        reg.build("tiny", ModelSpec(), n_features=0, n_classes=2)


def test_logreg_is_one_linear_layer() -> None:
    model = build_model(ModelSpec(name="logreg"), n_features=7, n_classes=3)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == 7 and linears[0].out_features == 3
    assert model(torch.zeros(5, 7)).shape == (5, 3)
    assert model.training


def test_mlp_follows_spec() -> None:
    model = build_model(ModelSpec(name="mlp", hidden=[8, 4], activation="tanh"), n_features=6, n_classes=2)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 8), (8, 4), (4, 2)]
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 2
    assert model(torch.zeros(3, 6)).shape == (3, 2)


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone() -> None:
    spec = ModelSpec(name="mlp", hidden=[16])
    rng_before = torch.get_rng_state()
    a = get_state(build_model(spec, n_features=5, n_classes=2, seed=7))
    b = get_state(build_model(spec, n_features=5, n_classes=2, seed=7))
    c = get_state(build_model(spec, n_features=5, n_classes=2, seed=8))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0.weight"], c["0.weight"])


def test_builtin_models_are_dp_compatible_as_they_are() -> None:
    for name in ("logreg", "mlp"):
        model = build_model(ModelSpec(name=name), n_features=4, n_classes=2)
        assert dp_problems(model) == []
        assert make_dp_compatible(model) is model


def test_batchnorm_is_fixed_on_a_copy() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    assert dp_problems(model)
    fixed = make_dp_compatible(model)
    assert dp_problems(fixed) == []
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fixed.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())
    assert isinstance(model[1], nn.BatchNorm1d)  # the original is untouched
    assert fixed(torch.zeros(3, 4)).shape == (3, 2)


class _ScaleWithBuffer(nn.Module):
    """A trainable layer that keeps a buffer: Opacus refuses it and has no fixer."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_unfixable_model_raises_model_error_listing_every_problem() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), _ScaleWithBuffer(4), nn.Linear(4, 4), _ScaleWithBuffer(4))
    with pytest.raises(ModelError) as info:
        make_dp_compatible(model)
    message = str(info.value)
    # BatchNorm was fixed; both buffered layers remain and are both named
    assert "BatchNorm" not in message
    assert message.count("trainable layer with buffers") == 2
    assert "2:" in message and "4:" in message


def test_state_round_trip() -> None:
    spec = ModelSpec(name="mlp", hidden=[8])
    src = build_model(spec, n_features=5, n_classes=3, seed=1)
    dst = build_model(spec, n_features=5, n_classes=3, seed=2)
    state = get_state(src)
    assert all(isinstance(v, np.ndarray) for v in state.values())
    set_state(dst, state)
    x = torch.randn(4, 5)
    assert torch.equal(src(x), dst(x))
    state["0.bias"][:] = 123.0  # get_state returns copies
    assert not torch.any(src[0].bias == 123.0)


def test_set_state_mismatch_names_the_parameter() -> None:
    model = build_model(ModelSpec(name="mlp", hidden=[8]), n_features=5, n_classes=2)
    state = get_state(model)
    bad = {**state, "0.weight": np.zeros((8, 6), dtype=np.float32)}
    with pytest.raises(ModelError, match=r"'0\.weight' has shape \(8, 6\), the model expects \(8, 5\)"):
        set_state(model, bad)
    missing = {k: v for k, v in state.items() if k != "2.bias"}
    with pytest.raises(ModelError, match=r"missing parameters: 2\.bias"):
        set_state(model, missing)
    with pytest.raises(ModelError, match="unexpected parameters: extra"):
        set_state(model, {**state, "extra": np.zeros(1)})


def test_get_state_strips_opacus_prefix() -> None:
    from opacus import GradSampleModule

    model = build_model(ModelSpec(name="logreg"), n_features=3, n_classes=2, seed=0)
    wrapped = GradSampleModule(model)
    try:
        assert set(get_state(wrapped)) == set(get_state(model)) == {"0.weight", "0.bias"}
        set_state(wrapped, get_state(model))
    finally:
        wrapped._close()
