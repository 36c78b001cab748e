"""A new linen layer from the engine in a few lines (the docs/design.md example)."""

from __future__ import annotations

import jax
import numpy as np

import reference
from normzoo.functional import Normalizer, Whiten, area
from normzoo.linen import Stateless


class GroupWhitening(Stateless):
    num_groups: int = 4
    use_scale: bool = True
    use_bias: bool = True

    def normalizer(self, shape):
        return Normalizer(area.group(self.num_groups), Whiten("zca"), reduction=self.reduction())


def test_group_whitening_layer_from_the_docs(rng):
    x = (0.5 + rng.standard_normal((3, 4, 4, 8))).astype(np.float32)
    layer = GroupWhitening()
    variables = layer.init(jax.random.key(0), x)
    assert jax.tree.map(np.shape, variables) == {"params": {"scale": (8,), "bias": (8,)}}
    params = {"scale": np.full(8, 2.0, np.float32), "bias": np.arange(8, dtype=np.float32)}
    y = layer.apply({"params": params}, x)
    expected = 2.0 * reference.group_whiten(x, 4, "zca") + np.arange(8)
    np.testing.assert_allclose(y, expected, rtol=3e-3, atol=3e-3)
