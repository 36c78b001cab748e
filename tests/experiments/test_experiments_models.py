"""Models: every registry normalizer fits the MLP; CNN and ResNet train a step on images."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments.data import load_dataset
from experiments.models import build_model, check_norm, default_norm_overrides, is_norm_param, norm_overrides_for
from experiments.train import Run, TrainSpec, final, train_job
from normzoo import registry


def test_gn_groups_divide_the_width():
    assert default_norm_overrides("gn", 100, 2) == {"num_groups": 25}
    assert default_norm_overrides("gn", 16, 4) == {"num_groups": 8}
    assert default_norm_overrides("ln", 16, 4) == {"reduction_axes": (1, 2, 3)}


def test_overrides_keep_only_accepted_fields():
    assert dict(norm_overrides_for("bn", stateful={"momentum": 0.9})) == {"momentum": 0.9}
    assert dict(norm_overrides_for("ln", stateful={"momentum": 0.9})) == {}  # stateless: not applied
    assert "not in normzoo.registry" in check_norm("no-such-layer", 8, 2)


def test_every_registry_name_builds_in_the_mlp():
    x = np.zeros((4, 8, 8, 1), np.float32)
    for name in registry.names():
        model = build_model("mlp", num_classes=10, width=8, depth=1, norm=name)
        variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
        own = [p for p, _ in jax.tree_util.tree_leaves_with_path(variables["params"]) if not is_norm_param(p)]
        assert len(own) == 4, name  # dense_0 kernel/bias, head kernel/bias


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "resnet"])
def test_conv_models_train_on_images(kind):
    data = load_dataset("digits", train_size=120)
    model = build_model(kind, num_classes=10, width=4, depth=2, norm="gn")
    res = train_job(model, TrainSpec(optimizer="adam", batch_size=32, epochs=1), data, [Run(seed=0, lr=1e-2)])
    assert np.isfinite(final(res.records[0], "train_loss"))


def _logits_both_apis(kind, norm, x, **kw):
    """Logits of a Linen model and of its NNX twin from the same variables (training-mode forward:
    stateful normalizers use batch statistics)."""
    from experiments.models import scale_init
    from experiments.nnx_models import NNXModel
    from experiments.train import draw_kernels, init_variables

    linen = build_model(kind, num_classes=10, norm=norm, **kw)
    nnx_model = build_model(kind, num_classes=10, norm=norm, api="nnx", **kw)
    assert isinstance(nnx_model, NNXModel)
    template = init_variables(linen, jax.numpy.asarray(x[:2]))
    variables = {**template, "params": scale_init(draw_kernels(template["params"], 3), "xavier", 1.0)}
    a, _ = linen.apply(variables, x, train=True, mutable=["batch_stats"])
    b, _ = nnx_model.apply(nnx_model.from_linen(variables, x.shape[1:]), x, train=True, mutable=["batch_stats"])
    return np.asarray(a), np.asarray(b)


@pytest.mark.parametrize("norm", ["ln", "dyt", "none"])
def test_transformer_linen_and_nnx_give_the_same_logits(norm):
    x = np.random.default_rng(0).standard_normal((6, 40, 1)).astype(np.float32)  # mnist1d's shape
    a, b = _logits_both_apis("transformer", norm, x, width=8, depth=2)
    assert a.shape == (6, 10) and np.all(np.isfinite(a))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_weight_standardized_cnn_linen_and_nnx_give_the_same_logits():
    x = np.random.default_rng(1).standard_normal((4, 40, 1)).astype(np.float32)
    a, b = _logits_both_apis("cnn", "gn", x, width=4, depth=2, weight_std=True)
    plain, _ = _logits_both_apis("cnn", "gn", x, width=4, depth=2)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert not np.allclose(a, plain)  # the kernels are standardized
