"""``axis_index_groups`` outside ``pmap``, and what to use instead under ``shard_map``.

jax implements grouped collectives (``lax.psum(..., axis_index_groups=...)``) under
``jax.pmap``, and under ``shard_map`` only with ``check_vma=False``; with the default
``check_vma=True`` it raises a bare NotImplementedError. normzoo turns that into a ValueError
naming the argument (``normzoo.functional.moments.collective``), on each of its three
cross-device paths: moments (BatchNorm), covariances (whitening) and the ghost-batch running
statistics. The ways that work, ``check_vma=False`` and a mesh axis per group, are checked
against the single-device statistics of each group.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import normzoo

from dist_helpers import NDEV, RTOL, close, data, mesh as data_mesh, shard_map

GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7]]


def _step(layer):
    """``step(variables, x) -> (y, new batch_stats)`` in training mode."""

    def step(variables, x):
        y, updates = layer.apply(variables, x, mutable=["batch_stats"])
        return y, updates["batch_stats"]

    return step


MAKERS = [
    lambda **kw: normzoo.BatchNorm(**kw),                               # moments
    lambda **kw: normzoo.ZCAWhitening(**kw),                            # covariance
    lambda **kw: normzoo.BatchNorm(virtual_batch_size=2, **kw),         # ghost running stats
]
MAKER_IDS = ["BatchNorm", "ZCAWhitening", "ghost BN"]


def _grouped(make, x, check_vma: bool):
    """``shard_map`` of one training step with ``axis_index_groups=GROUPS``; the stats come
    back one row per device."""
    layer = make(use_running_average=False, axis_name="data", axis_index_groups=GROUPS,
                 momentum=0.0)
    variables = layer.clone(axis_name=None, axis_index_groups=None).init(jax.random.key(0), x)

    def local(x):
        y, stats = _step(layer)(variables, x)
        return y, jax.tree_util.tree_map(lambda s: s[None], stats)

    return variables, shard_map(local, data_mesh(), in_specs=P("data"),
                                out_specs=(P("data"), P("data")), check_vma=check_vma)


@pytest.mark.parametrize("make", MAKERS, ids=MAKER_IDS)
def test_shard_map_axis_index_groups_is_a_value_error_naming_it(make):
    x = data((2 * NDEV, 4))
    _, f = _grouped(make, x, check_vma=True)
    with pytest.raises(ValueError, match=r"axis_index_groups=.*check_vma=False.*mesh axis"):
        f(x)


@pytest.mark.parametrize("make", MAKERS, ids=MAKER_IDS)
def test_shard_map_axis_index_groups_without_vma_checks_is_per_group(make):
    """``check_vma=False``: each group's running statistics are the single-device ones of
    its half of the batch (the layer with ``axis_name=None`` on that half)."""
    x = data((2 * NDEV, 4), seed=3)
    x[NDEV:] = 2.0 * x[NDEV:] + 3.0  # the two groups differ
    variables, f = _grouped(make, x, check_vma=False)
    _, stats = f(x)
    plain = make(use_running_average=False, momentum=0.0)
    for g, group in enumerate(GROUPS):
        half = x[g * NDEV:(g + 1) * NDEV]
        _, s_ref = jax.jit(_step(plain))(variables, half)
        for d in group:
            close(jax.tree_util.tree_map(lambda s: s[d], stats), s_ref,
                  rtol=1e-4, what=f"group {g} device {d}")
    assert not np.allclose(stats["mean"][0], stats["mean"][4])


def test_shard_map_per_group_statistics_with_a_mesh_axis_per_group():
    """Mesh (group=2, data=4), batch sharded over both, ``axis_name='data'``: each group's
    statistics are the single-device statistics of its half of the batch."""
    if len(jax.devices()) < NDEV:
        pytest.skip("needs 8 devices")
    devices = np.array(jax.devices()[:NDEV]).reshape(2, NDEV // 2)
    mesh = jax.sharding.Mesh(devices, ("group", "data"))
    x = data((4 * NDEV, 3), seed=1, loc=2.0)
    x[: 2 * NDEV] *= 3.0  # the two groups' statistics differ
    layer = normzoo.BatchNorm(use_running_average=False, axis_name="data", momentum=0.0)
    variables = normzoo.BatchNorm(use_running_average=False).init(jax.random.key(0), x)

    def local(x):
        y, stats = _step(layer)(variables, x)
        return y, jax.tree_util.tree_map(lambda s: s[None], stats)  # one row per group

    y, stats = shard_map(local, mesh, in_specs=P(("group", "data")),
                         out_specs=(P(("group", "data")), P("group")))(x)
    plain = jax.jit(_step(normzoo.BatchNorm(use_running_average=False, momentum=0.0)))
    half = 2 * NDEV
    for g in range(2):
        y_ref, s_ref = plain(variables, x[g * half:(g + 1) * half])
        close(y[g * half:(g + 1) * half], y_ref, what=f"group {g} y")
        close(jax.tree_util.tree_map(lambda s: s[g], stats), s_ref, what=f"group {g} stats")
        np.testing.assert_allclose(stats["mean"][g], x[g * half:(g + 1) * half].mean(0),
                                   rtol=RTOL, atol=1e-5)
    assert not np.allclose(stats["var"][0], stats["var"][1])


def test_pmap_ghost_batch_norm_axis_index_groups_averages_within_groups():
    """Under pmap the grouped pmean of the ghost-batch running statistics still works: each
    group's running mean is the mean of its devices' chunk means."""
    if len(jax.devices()) < NDEV:
        pytest.skip("needs 8 devices")
    x = data((NDEV, 4, 3), seed=2)
    x[4:] += 5.0
    layer = normzoo.BatchNorm(use_running_average=False, axis_name="data",
                              axis_index_groups=GROUPS, virtual_batch_size=2, momentum=0.0)
    variables = normzoo.BatchNorm(use_running_average=False).init(jax.random.key(0), x[0])
    _, stats = jax.pmap(lambda x: _step(layer)(variables, x), axis_name="data")(x)
    for group in GROUPS:
        expected = x[group].mean(axis=(0, 1))
        for d in group:
            np.testing.assert_allclose(stats["mean"][d], expected, rtol=RTOL, atol=1e-5)
    assert not np.allclose(stats["mean"][0], stats["mean"][4])
