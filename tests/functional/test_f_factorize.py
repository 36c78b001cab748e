"""normzoo.functional.factorize: on CPU, factorizations run one matrix at a time (no batched
LAPACK call, whose thread-pool wait can hang when several run at once), with the batched
call's numbers, also under vmap, jit and second derivatives."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normzoo.functional.factorize import serial_on_cpu
from normzoo.functional.whitening import whitening_matrix


def _spd(shape, seed=0):
    a = np.random.default_rng(seed).standard_normal(shape + (shape[-1],)).astype(np.float32)
    return jnp.asarray(a @ np.swapaxes(a, -1, -2) / shape[-1] + 0.1 * np.eye(shape[-1], dtype=np.float32))


def _lapack_operand_shapes(hlo: str) -> list[str]:
    """Operand shapes of the LAPACK custom calls in a compiled CPU module."""
    return re.findall(r"f32\[([0-9,]*)\][^\n]*custom_call_target=\"lapack_", hlo)


def test_results_equal_the_batched_call_under_vmap_and_jit():
    sigma = _spd((3, 4, 6))  # vmapped 3, batch of 4 matrices 6 x 6
    serial = jax.jit(jax.vmap(serial_on_cpu(jnp.linalg.eigvalsh)))(sigma)
    np.testing.assert_allclose(serial, jnp.linalg.eigvalsh(sigma), rtol=1e-5, atol=1e-6)
    single = serial_on_cpu(jnp.linalg.eigvalsh)(sigma[0, 0])
    np.testing.assert_allclose(single, jnp.linalg.eigvalsh(sigma[0, 0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky"])
def test_vmapped_whitening_makes_no_batched_lapack_call_on_cpu(method):
    sigma = _spd((5, 4, 8))
    serial = jax.jit(jax.vmap(lambda c: whitening_matrix(c, method)))
    batched = jax.jit(jax.vmap(lambda c: whitening_matrix(c, method, serial_on_cpu=False)))
    np.testing.assert_allclose(serial(sigma), batched(sigma), rtol=2e-5, atol=2e-5)
    if jax.default_backend() == "cpu":
        shapes = _lapack_operand_shapes(serial.lower(sigma).compile().as_text())
        assert shapes and all(s == "8,8" for s in shapes), shapes
        batched_shapes = _lapack_operand_shapes(batched.lower(sigma).compile().as_text())
        assert any(s.startswith("5,4,") or s.startswith("20,") for s in batched_shapes), batched_shapes


def test_first_and_second_derivatives_match_the_batched_call():
    sigma = _spd((2, 5))

    def loss(s, serial):
        return jnp.sum(jnp.sin(whitening_matrix(s, "zca", serial_on_cpu=serial)))

    for order in (1, 2):
        def d(serial, s=sigma):
            g = jax.grad(loss)
            if order == 2:
                return jax.grad(lambda s: jnp.sum(g(s, serial) ** 2))(s)
            return g(s, serial)
        np.testing.assert_allclose(d(True), d(False), rtol=1e-4, atol=1e-5, err_msg=f"order {order}")
