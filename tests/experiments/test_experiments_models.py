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
