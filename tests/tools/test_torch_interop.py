"""PyTorch BatchNorm interop (normzoo.tools.torch_interop): momentum, state dicts both ways,
eval outputs equal to PyTorch's formula (and to torch itself where it is installed)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normzoo
import normzoo.nnx as znnx
from normzoo.tools import (
    flax_momentum_to_torch,
    from_torch_batch_norm,
    to_torch_batch_norm,
    torch_momentum_to_flax,
)


def _state_dict(c=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "weight": rng.normal(size=c).astype(np.float32),
        "bias": rng.normal(size=c).astype(np.float32),
        "running_mean": rng.normal(size=c).astype(np.float32),
        "running_var": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "num_batches_tracked": np.asarray(17, np.int64),
    }


def test_momentum():
    assert torch_momentum_to_flax(0.1) == pytest.approx(0.9)
    assert torch_momentum_to_flax(None) == "cumulative"
    assert flax_momentum_to_torch(0.99) == pytest.approx(0.01)
    assert flax_momentum_to_torch("cumulative") is None
    with pytest.raises(ValueError, match="momentum=1.5"):
        torch_momentum_to_flax(1.5)
    with pytest.raises(TypeError, match="momentum"):
        torch_momentum_to_flax("0.1")


def test_state_dict_round_trip_and_eval_nchw():
    sd = _state_dict()
    variables = from_torch_batch_norm(sd)
    assert set(variables["params"]) == {"scale", "bias"}
    assert set(variables["batch_stats"]) == {"mean", "var"}
    back = to_torch_batch_norm(variables, num_batches_tracked=17)
    assert list(back) == ["weight", "bias", "running_mean", "running_var",
                          "num_batches_tracked"]
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key])
    # PyTorch's eval formula on NCHW; normzoo's BatchNorm on NHWC with the converted variables
    x = np.random.default_rng(1).normal(size=(2, 4, 3, 3)).astype(np.float32)
    c = (1, -1, 1, 1)
    expected = ((x - sd["running_mean"].reshape(c)) / np.sqrt(sd["running_var"].reshape(c) + 1e-5)
                * sd["weight"].reshape(c) + sd["bias"].reshape(c))
    y = normzoo.BatchNorm(use_running_average=True, epsilon=1e-5).apply(
        variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(y).transpose(0, 3, 1, 2), expected, rtol=1e-5,
                               atol=1e-5)
    # an NNX layer's variables, through nnx_to_linen
    bn = znnx.BatchNorm(4, rngs=nnx.Rngs(0))
    znnx.linen_to_nnx(variables, bn)
    np.testing.assert_array_equal(to_torch_batch_norm(znnx.nnx_to_linen(bn))["running_var"],
                                  sd["running_var"])


def test_prefix_affine_false_count_and_errors():
    sd = {f"layer1.bn.{k}": v for k, v in _state_dict().items()}
    out = from_torch_batch_norm(sd, prefix="layer1.bn.", count=True)
    assert int(out["batch_stats"]["count"]) == 17
    assert int(to_torch_batch_norm(out)["num_batches_tracked"]) == 17
    no_affine = {k: v for k, v in _state_dict().items() if k not in ("weight", "bias")}
    out = from_torch_batch_norm(no_affine)
    assert "params" not in out
    assert "weight" not in to_torch_batch_norm(out)
    with pytest.raises(KeyError, match="'bias' but not 'weight'"):
        from_torch_batch_norm({k: v for k, v in _state_dict().items() if k != "weight"})
    with pytest.raises(KeyError, match="none of"):
        from_torch_batch_norm(sd)  # the prefix is missing
    with pytest.raises(ValueError, match="differ in length"):
        from_torch_batch_norm({**_state_dict(), "bias": np.zeros(3, np.float32)})
    with pytest.raises(TypeError, match="mapping"):
        from_torch_batch_norm([1, 2])
    with pytest.raises(KeyError, match="'mean' and 'var'"):
        to_torch_batch_norm({"params": {"scale": np.ones(4)}})


def test_against_torch_batch_norm_2d():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(4))
        bn.bias.copy_(torch.randn(4))
    x = torch.randn(8, 4, 3, 3) * 2 + 1
    initial = from_torch_batch_norm(bn.state_dict())
    bn.train()
    bn(x)  # one training step: running stats updated with the unbiased batch variance
    bn.eval()
    variables = from_torch_batch_norm(bn.state_dict())
    x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    layer = normzoo.BatchNorm(momentum=torch_momentum_to_flax(0.1), epsilon=bn.eps)
    y = layer.apply(variables, x_nhwc, use_running_average=True)
    np.testing.assert_allclose(np.asarray(y).transpose(0, 3, 1, 2), bn(x).detach().numpy(),
                               rtol=1e-5, atol=1e-5)
    # the same training step in normzoo: the same mean, the biased variance
    _, updates = layer.apply(initial, x_nhwc, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(updates["batch_stats"]["mean"], variables["batch_stats"]["mean"],
                               rtol=1e-5, atol=1e-6)
    n = 8 * 3 * 3
    biased_batch_var = (np.asarray(updates["batch_stats"]["var"]) - 0.9) / 0.1
    unbiased = 0.9 * 1.0 + 0.1 * biased_batch_var * n / (n - 1)
    np.testing.assert_allclose(unbiased, variables["batch_stats"]["var"], rtol=1e-5)
    sd = to_torch_batch_norm(variables, num_batches_tracked=1)
    fresh = torch.nn.BatchNorm2d(4)
    fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()})
    fresh.eval()
    np.testing.assert_allclose(fresh(x).detach().numpy(), bn(x).detach().numpy(), rtol=1e-6,
                               atol=1e-6)
