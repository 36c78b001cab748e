"""The shared ``cpu_kernels`` fixture (tests/conftest.py): one layer test, kernels off and on."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import normzoo


def test_layer_norm_matches_flax_with_kernels_off_and_on(cpu_kernels):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((256, 512)), jnp.float32)
    v = nn.LayerNorm().init(jax.random.key(0), x)
    text = jax.jit(lambda x: normzoo.LayerNorm().apply(v, x)).lower(x).as_text()
    assert ("normzoo_row_norm" in text) == cpu_kernels  # 2^17 elements: the forward kernel
    np.testing.assert_allclose(normzoo.LayerNorm().apply(v, x), nn.LayerNorm().apply(v, x),
                               rtol=2e-5, atol=2e-5)
