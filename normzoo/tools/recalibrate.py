"""Precise BatchNorm: re-estimating a trained model's population statistics.

Wu & Johnson ("Rethinking 'Batch' in BatchNorm", 2021, section 3) show that the EMA of
training is a poor estimate of the population statistics (it lags the weights and weighs the
last batches most) and replace it, after training, by the equal-weight average over ``n``
batches of each batch's statistics, computed with the weights frozen::

    mu = (1 / n) sum_t mu_t,    var = (1 / n) sum_t var_t

(``mu_t``, ``var_t``: what the layer's estimator would fold in at batch ``t``, i.e. the
batch statistics of the training-mode forward pass; for whitening layers the batch mean and
covariance or whitening matrix). PyTorch's ``torch.optim.swa_utils.update_bn`` does the same
(momentum None, a cumulative average), used after SWA (Izmailov et al. 2018).

How the per-batch statistics are read, exactly and generically:

* normzoo's layers: every running statistic goes through the layer's
  :class:`~normzoo.functional.engine.Normalizer` and its estimator. During recalibration the
  estimator is wrapped so that its update returns the batch's statistics themselves (the
  same forward pass: ``correct`` of Batch Renorm and ghost batches included, from the
  original running statistics), so ``mu_t`` is exact, whatever the estimator (EMA, debiased
  EMA, cumulative, renorm) and operation (standardize, center, scale, whitening);
* flax's ``BatchNorm``: its update is ``m * running + (1 - m) * batch``; started from zero,
  ``batch = updated / (1 - m)`` (one float32 rounding; ``momentum=1`` cannot be
  recalibrated). In NNX ``momentum`` is set to 0 for the pass instead (exact).

Layers with ``estimator="population"`` (frozen statistics, used in training too) are left
as they are, and so is every other ``batch_stats`` variable (flax's SpectralNorm, layers
outside this scheme). The weights never change. ``count`` (the update counter of normzoo's
counting estimators) is kept, as it is their step clock (debiased EMA, Batch Renorm
schedules), except for ``estimator="cumulative"``, whose ``count`` becomes ``n``: its
statistic is now the average of ``n`` batches.

Modes: :func:`recalibrate_nnx` switches only the normalization layers to batch statistics
and leaves the rest of the model as it is (Dropout stays off in an ``eval()`` model); in Linen
the caller's ``apply_kwargs`` select training mode, and a ``train=True`` that also turns
Dropout on needs ``rngs=``. (PyTorch's ``update_bn`` calls ``model.train()``, Dropout
included.) Every batch has the same weight,
whatever its size (as Wu & Johnson and PyTorch); a layer applied several times per forward
pass contributes its last application.

The batch variances are normzoo's and flax's, biased (divided by the ``m`` elements per
channel of a batch; PyTorch averages the unbiased ones), so their average is the population
variance times ``(m - 1) / m``: negligible unless batches are tiny. For tiny batches Wu &
Johnson's appendix (and fvcore's ``precise_bn``) use the variance of all batches combined,
``mean_t(var_t) + mean_t(mu_t^2) - mean_t(mu_t)^2`` (for batches of equal size): pass
``variance="combined"`` (layers with a ``mean`` and a ``var``; computed shifted by the first
batch's mean, so accurate when ``|mu| >> std``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.module import merge_param

from normzoo.functional.estimators import COUNT, Cumulative, Estimator, Population
from normzoo.linen.base import Normalization as LinenNormalization
from normzoo.nnx.base import Normalization as NNXNormalization

Path = tuple[str, ...]

#: Sentinel variance for flax.nnx.BatchNorm: a variance is never negative, so a layer whose
#: ``var`` is still this after a batch did not run in training mode.
_UNSET = -1.0


@dataclasses.dataclass(frozen=True)
class Capture(Estimator):
    """An estimator whose update is the batch's statistics themselves (``w = 1``), for
    recalibration; everything else (state, training correction, inference) is ``inner``'s.

    ``on_update`` is called (at trace time under ``jit``) when the update runs, so the caller
    knows which layers ran in training mode.
    """

    running: ClassVar[bool] = True

    inner: Estimator = dataclasses.field(default_factory=Estimator)
    on_update: Callable[[], None] | None = dataclasses.field(default=None, compare=False)

    @property
    def counts(self) -> bool:  # type: ignore[override]
        return self.inner.counts

    @property
    def normalizes_with_running(self) -> bool:  # type: ignore[override]
        return self.inner.normalizes_with_running

    @property
    def corrects_batch(self) -> bool:  # type: ignore[override]
        return getattr(self.inner, "corrects_batch", False)

    def init(self, stats):
        return self.inner.init(stats)

    def correct(self, running, batch, epsilon):
        return self.inner.correct(running, batch, epsilon)

    def inference(self, running):
        return self.inner.inference(running)

    def update(self, running, batch):
        if self.on_update is not None:
            self.on_update()
        return {**running, **batch}


def capturable(estimator: Estimator) -> bool:
    """Whether recalibration re-estimates this estimator's statistics (running ones that
    training does not normalize with)."""
    return estimator.running and not estimator.normalizes_with_running and not isinstance(
        estimator, Population)


def _input(batch: Any) -> Any:
    """PyTorch's ``update_bn`` convention: a tuple / list batch is ``(inputs, ...)``."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


# --------------------------------------------------------------------------- Linen
@dataclasses.dataclass
class _Layer:
    kind: str                  # "normzoo" or "flax"
    counts_batches: bool = False
    trained: bool = False


def recalibrate_linen(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    jit: bool = True,
    strict: bool = True,
    variance: str = "batch_average",
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Precise BN (Wu & Johnson 2021): ``batch_stats`` re-estimated as the equal-weight
    average ``(1/n) sum_t stat_t`` of the per-batch statistics over ``batches``, the weights
    frozen (module docstring).

    Args:
      apply_fn: ``model.apply`` (or a function with its signature); called as
        ``apply_fn(variables, x, mutable=["batch_stats"], **apply_kwargs)``.
      variables: the trained model's ``{'params': ..., 'batch_stats': ...}`` (not changed).
      batches: an iterable of inputs; a tuple / list batch is ``(x, labels, ...)`` and only
        ``x`` is given to the model (as PyTorch's ``update_bn``); map other layouts first,
        e.g. ``(b["image"] for b in loader)``. Read once.
      jit: run each batch under ``jax.jit`` (one compilation per input shape).
      strict: raise when a normalization layer reached by the forward pass did not run in
        training mode (it would keep its old statistics).
      variance: ``"batch_average"`` (``mean_t var_t``, Wu & Johnson's and PyTorch's) or
        ``"combined"`` (the variance of all batches together; module docstring).
      **apply_kwargs: what puts the model's normalization layers in training mode, e.g.
        ``train=True`` (and ``rngs=`` if the model needs them); ``mutable=`` may add
        collections.

    Returns:
      New variables: ``params`` (and other collections) as given, ``batch_stats`` with every
      recalibrated layer's statistics replaced (dtypes kept); see the module docstring for
      which layers and ``count``.

    Raises:
      ValueError: ``batches`` empty; a layer that ran with ``use_running_average=True``
        (``strict``); no layer to recalibrate; flax's BatchNorm with ``momentum=1``.
      TypeError: ``apply_fn`` not callable, ``variables`` without ``batch_stats``.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable (model.apply); got {type(apply_fn).__name__}")
    average = _Average(variance)
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        raise TypeError("variables must be a mapping with a 'batch_stats' collection; got "
                        + (f"keys {sorted(variables)}" if isinstance(variables, Mapping)
                           else type(variables).__name__))
    mutable = apply_kwargs.pop("mutable", ["batch_stats"])
    mutable = [mutable] if isinstance(mutable, str) else list(mutable)
    if "batch_stats" not in mutable:
        mutable.append("batch_stats")
    layers: dict[Path, _Layer] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, LinenNormalization) and context.method_name == "normalizer":
            norm = next_fun(*args, **kwargs)
            if not capturable(norm.estimator) or module.scope is None:
                return norm
            path = tuple(module.scope.path)
            layer = layers.setdefault(path, _Layer(
                "normzoo", counts_batches=isinstance(norm.estimator, Cumulative)))

            def on_update(layer=layer):
                layer.trained = True

            return dataclasses.replace(norm, estimator=Capture(inner=norm.estimator,
                                                               on_update=on_update))
        if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
            return _flax_batch_norm(module, next_fun, args, kwargs, layers)
        return next_fun(*args, **kwargs)

    def step(variables, x):
        with nn.intercept_methods(interceptor):
            _, updates = apply_fn(variables, x, mutable=mutable, **apply_kwargs)
        return updates["batch_stats"]

    run = jax.jit(step) if jit else step
    original = _to_dicts(variables["batch_stats"])
    for batch in batches:
        stats = _to_dicts(run(variables, _input(batch)))
        if average.n == 0:
            _check_layers(layers, strict, "apply_kwargs (e.g. train=True)")
        average.add({path: {k: v for k, v in _node(stats, path).items() if k != COUNT}
                     for path, layer in layers.items() if layer.trained})
    n = average.n
    new_stats = _to_dicts(original)
    for path, result in average.result().items():
        node = _node(new_stats, path)
        for key, value in result.items():
            node[key] = value.astype(jnp.asarray(node[key]).dtype)
        if layers[path].counts_batches and COUNT in node:
            node[COUNT] = jnp.asarray(n, jnp.asarray(node[COUNT]).dtype)
    out = {**variables, "batch_stats": new_stats}
    return type(variables)(out) if not isinstance(variables, dict) else out


def _flax_batch_norm(module, next_fun, args, kwargs, layers):
    """flax.linen.BatchNorm's call with its statistics started from zero and replaced by the
    batch's, ``updated / (1 - momentum)``."""
    flag = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    use_running_average = merge_param("use_running_average", module.use_running_average, flag)
    path = tuple(module.scope.path)
    layer = layers.setdefault(path, _Layer("flax"))
    if use_running_average or module.is_initializing():
        return next_fun(*args, **kwargs)
    if module.momentum >= 1:
        raise ValueError(f"flax BatchNorm at batch_stats/{'/'.join(path)} has momentum="
                         f"{module.momentum!r}: it never updates, so it cannot be recalibrated")
    layer.trained = True
    if module.has_variable("batch_stats", "mean"):
        for key in ("mean", "var"):
            module.put_variable("batch_stats", key,
                                jnp.zeros_like(module.get_variable("batch_stats", key)))
    y = next_fun(*args, **kwargs)
    for key in ("mean", "var"):
        updated = module.get_variable("batch_stats", key)
        module.put_variable("batch_stats", key,
                            updated / jnp.asarray(1 - module.momentum, updated.dtype))
    return y


def _check_layers(layers: Mapping[Any, Any], strict: bool, how: str) -> None:
    if not layers:
        raise ValueError("recalibrate: no normalization layer whose running statistics can be "
                         "re-estimated (normzoo's layers with a running estimator other than "
                         "'population', flax's BatchNorm) was found")
    if not strict:
        return
    idle = ["/".join(map(str, p)) for p, layer in layers.items() if not layer.trained]
    if idle:
        raise ValueError(
            f"recalibrate: the layers at {idle} did not run in training mode (they ran with "
            "use_running_average=True, or not at all), so their statistics would not be "
            f"re-estimated; put them in training mode through {how}, or pass strict=False to "
            "keep their statistics"
        )


#: Values of ``variance=``.
VARIANCES = ("batch_average", "combined")


class _Average:
    """The equal-weight average over batches of per-layer statistics ``{path: {key: value}}``,
    accumulated in float32 (or wider); ``combined``: ``var`` becomes the variance of all
    batches together, ``mean_t var_t + mean_t (mu_t - s)^2 - (mean_t (mu_t - s))^2`` with the
    shift ``s`` the first batch's mean."""

    def __init__(self, variance: str):
        if variance not in VARIANCES:
            raise ValueError(f"variance={variance!r} is unknown; expected one of {VARIANCES}")
        self.combined = variance == "combined"
        self.n = 0
        self.sums: dict[Path, dict[str, jax.Array]] = {}
        self.shifts: dict[Path, jax.Array] = {}

    def add(self, stats: Mapping[Path, Mapping[str, jax.Array]]) -> None:
        for path, values in stats.items():
            values = {k: _wide(v) for k, v in values.items()}
            if self.combined and _has_moments(values):
                shift = self.shifts.setdefault(path, values["mean"])
                d = values["mean"] - shift
                values = {**values, "_d": d, "_d2": d * d}
            sums = self.sums.get(path)
            self.sums[path] = values if sums is None else {
                k: sums[k] + values[k] for k in sums}
        self.n += 1

    def result(self) -> dict[Path, dict[str, jax.Array]]:
        if self.n == 0:
            raise ValueError("batches is empty: recalibration needs at least one batch")
        out = {}
        for path, sums in self.sums.items():
            mean = {k: v / self.n for k, v in sums.items()}
            if "_d" in mean:
                mean["var"] = mean["var"] + mean.pop("_d2") - jnp.square(mean.pop("_d"))
            out[path] = mean
        return out


def _wide(value: Any) -> jax.Array:
    value = jnp.asarray(value)
    return value.astype(jnp.promote_types(value.dtype, jnp.float32))


def _has_moments(values: Mapping[str, Any]) -> bool:
    return ("mean" in values and "var" in values
            and jnp.shape(values["mean"]) == jnp.shape(values["var"]))


def _to_dicts(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_dicts(v) for k, v in tree.items()}
    return tree


def _node(tree: Mapping[str, Any], path: Path) -> Any:
    node = tree
    for part in path:
        node = node[part]
    return node


# --------------------------------------------------------------------------- NNX
def _default_call(model: Any, batch: Any) -> Any:
    return model(_input(batch))


def recalibrate_nnx(
    model: Any,
    batches: Iterable[Any],
    call: Callable[[Any, Any], Any] = _default_call,
    *,
    jit: bool = True,
    strict: bool = True,
    variance: str = "batch_average",
) -> Any:
    """Precise BN (Wu & Johnson 2021) for an NNX model, in place: every normalization layer's
    ``nnx.BatchStat`` s become the equal-weight average ``(1/n) sum_t stat_t`` of the
    per-batch statistics over ``batches``; the weights are not changed (module docstring).

    Args:
      model: an NNX module holding normzoo.nnx layers and / or ``flax.nnx.BatchNorm`` s.
      batches: an iterable of batches, read once.
      call: ``call(model, batch)`` runs the forward pass (default: ``model(x)``, with ``x =
        batch[0]`` for a tuple / list batch, as PyTorch's ``update_bn``).
      jit: run ``call`` under ``nnx.jit``.
      strict: raise when a normalization layer of the model did not run in training mode
        during the first batch (not reached by ``call``, or given ``use_running_average=True``
        by it).
      variance: ``"batch_average"`` (``mean_t var_t``, Wu & Johnson's and PyTorch's) or
        ``"combined"`` (the variance of all batches together; module docstring).

    During the pass every recalibrated layer has ``use_running_average=False``; its mode (and
    flax BatchNorm's ``momentum``) is restored after, as is every other ``nnx.BatchStat``.

    Returns:
      ``model`` (updated in place).

    Raises:
      ValueError: ``batches`` empty; no layer to recalibrate; a layer that did not run in
        training mode (``strict``).
      TypeError: ``model`` not an NNX module, ``call`` not callable.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module; got {type(model).__name__}")
    if not callable(call):
        raise TypeError(f"call must be callable call(model, batch); got {type(call).__name__}")
    average = _Average(variance)
    normzoo_layers: dict[Path, Any] = {}
    flax_layers: dict[Path, Any] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, NNXNormalization) and node.stat_names:
            if not issubclass(node.linen, LinenNormalization):
                raise ValueError(
                    f"recalibrate_nnx: {type(node).__name__} at {'/'.join(map(str, path))} keeps "
                    "running statistics outside the taxonomy's estimators; it cannot be "
                    "recalibrated (supported: normzoo's normalizers and flax's BatchNorm)")
            if capturable(_nominal_normalizer(node).estimator):
                normzoo_layers[tuple(path)] = node
        elif isinstance(node, nnx.BatchNorm):
            flax_layers[tuple(path)] = node
    records = {p: _Layer("normzoo", counts_batches=isinstance(
        _nominal_normalizer(layer).estimator, Cumulative)) for p, layer in normzoo_layers.items()}
    records.update({p: _Layer("flax") for p in flax_layers})
    _check_layers(records, False, "")
    # A snapshot (nnx.state's leaves are the model's own Variables, which the pass changes).
    original = jax.tree.map(lambda value: value, nnx.state(model, nnx.BatchStat))
    saved = {p: (layer, layer.use_running_average, getattr(layer, "momentum", None))
             for p, layer in {**normzoo_layers, **flax_layers}.items()}
    try:
        for path, layer in normzoo_layers.items():
            _patch(layer, records[path])
            layer.use_running_average = False
        for layer in flax_layers.values():
            layer.use_running_average = False
            layer.momentum = 0.0
        run = nnx.jit(call) if jit else call
        for batch in batches:
            nnx.update(model, original)
            for layer in flax_layers.values():
                layer.var.set_value(jnp.full_like(layer.var[...], _UNSET))
            run(model, batch)
            chosen = {}
            for path, layer in normzoo_layers.items():
                keys = [k for k in layer.stat_names if k != COUNT]
                chosen[path] = {k: getattr(layer, k)[...] for k in keys}
            for path, layer in flax_layers.items():
                if average.n == 0:
                    records[path].trained = bool(jnp.all(layer.var[...] >= 0))
                chosen[path] = {"mean": layer.mean[...], "var": layer.var[...]}
            if average.n == 0:
                _check_layers(records, strict, "call (and the layers' own flags)")
                trained = {p for p in chosen if records[p].trained}
            average.add({p: v for p, v in chosen.items() if p in trained})
        results = average.result()
        n = average.n
        nnx.update(model, original)
        for path, result in results.items():
            layer = saved[path][0]
            for key, value in result.items():
                variable = getattr(layer, key)
                variable.set_value(value.astype(variable.dtype))
            if records[path].counts_batches and COUNT in layer.stat_names:
                layer.count.set_value(jnp.asarray(n, layer.count.dtype))
    finally:
        for path, (layer, flag, momentum) in saved.items():
            layer.use_running_average = flag
            if path in flax_layers:
                layer.momentum = momentum
            else:
                _unpatch(layer)
    return model


def _nominal_normalizer(layer: Any) -> Any:
    from normzoo.nnx.base import nominal_shape

    return layer.normalizer(nominal_shape(layer._twin(), layer.num_features))


def _patch(layer: Any, record: _Layer) -> None:
    """Makes ``layer``'s twin normalize with a :class:`Capture` estimator (through the NNX
    base's ``_compute`` seam, intercepting the twin's ``normalizer``)."""
    compute = type(layer)._compute.__get__(layer)

    def on_update():
        record.trained = True

    def patched(twin, *args, **kwargs):
        def interceptor(next_fun, a, kw, context):
            norm = next_fun(*a, **kw)
            if (context.module is not twin or context.method_name != "normalizer"
                    or not capturable(norm.estimator)):
                return norm
            return dataclasses.replace(norm, estimator=Capture(inner=norm.estimator,
                                                               on_update=on_update))

        with nn.intercept_methods(interceptor):
            return compute(twin, *args, **kwargs)

    layer._compute = patched


def _unpatch(layer: Any) -> None:
    if "_compute" in vars(layer):
        del layer._compute
