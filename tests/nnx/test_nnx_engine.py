"""A new NNX layer is its linen twin plus one line (the docs/design.md example)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

import reference
from normzoo.functional import Normalizer, Whiten, area
from normzoo.linen import Stateless
from normzoo.nnx import Stateless as NNXStateless


class GroupWhitening(Stateless):
    num_groups: int = 4
    use_scale: bool = True
    use_bias: bool = True

    def normalizer(self, shape):
        return Normalizer(area.group(self.num_groups), Whiten("zca"), reduction=self.reduction())


class GroupWhiteningNNX(NNXStateless, linen=GroupWhitening):
    pass


def test_group_whitening_nnx_twin_from_the_docs(rng):
    x = (0.5 + rng.standard_normal((3, 4, 4, 8))).astype(np.float32)
    layer = GroupWhiteningNNX(8, num_groups=4, rngs=nnx.Rngs(0))
    assert jax.tree.map(np.shape, nnx.to_pure_dict(nnx.state(layer))) == {"scale": (8,), "bias": (8,)}
    assert isinstance(layer.scale, nnx.Param) and isinstance(layer.bias, nnx.Param)
    layer.scale[...] = np.full(8, 2.0, np.float32)
    layer.bias[...] = np.arange(8, dtype=np.float32)
    expected = 2.0 * reference.group_whiten(x, 4, "zca") + np.arange(8)
    np.testing.assert_allclose(layer(x), expected, rtol=3e-3, atol=3e-3)


def test_nnx_twin_takes_exactly_the_linen_fields():
    layer = GroupWhiteningNNX(8, rngs=nnx.Rngs(0), use_bias=False)
    assert layer.bias is None and layer.num_groups == 4
    try:
        GroupWhiteningNNX(8, rngs=nnx.Rngs(0), num_group=2)
    except TypeError as error:
        assert "num_group" in str(error)
    else:
        raise AssertionError("an unknown keyword was accepted")
