"""Rows that look like training: layer loops whose loss depends on y, and whole train steps.

Two kinds of groups, timed by :func:`benchmarks.harness.time_group` like the layer rows
(one jitted ``lax.fori_loop`` per implementation, output fed back, the per-iteration slope
between runs of ``n`` and ``2 n`` iterations, interleaved repeats, medians):

* ``kind="loss"`` (:func:`loss_groups`): one layer, ``loss = 0.5 sum(y^2) + sum(y c)`` with a
  fixed random ``c``, so the upstream gradient ``y + c`` changes every iteration and nothing
  of the backward pass can be hoisted out of the loop. Two modes:

  - ``x+params``: grads of x and params, ``x <- x - lr dx``,
    ``params <- params - lr dparams / k`` (``k`` the elements per param, as in
    :mod:`benchmarks.layers`);
  - ``x only``:  params frozen and not differentiated (fine-tuning with frozen norm layers;
    BN eval is BatchNorm at inference under ``grad``): only ``dx`` is computed and used, so
    XLA may drop every parameter reduction, and an implementation that cannot be partly
    dropped pays for them.

  Columns: ``flax`` (flax.linen with its defaults), ``normzoo`` (default path), ``normzoo_cpu``
  (opt-in CPU kernels, when available), the copy ``x + 1`` and its identical twin.

* ``kind="train"`` (:func:`train_groups`): a jitted optax train step of a whole model,
  ``(params, batch_stats, opt_state) <- step(...)`` on one fixed batch, carried through the
  loop. Each model is written once with the norm layer's class as a field and built with
  ``flax.linen``'s and with normzoo's; both must declare the same variables and are given
  the same values (:func:`init_variables`). Columns: ``flax``, ``normzoo``, ``normzoo_cpu`` and ``flax_twin``, a
  second, separately compiled flax loop: ``flax / flax_twin`` is how far apart two identical
  programs of this size land in this run, the noise against which a ratio is judged.
  The loss after the first step of every column is compared with flax's before any timing,
  and the run stops (AssertionError) when they differ by more than :data:`LOSS_RTOL`.

Models (float32 params in every dtype; in bfloat16 the layers' and the model's ``dtype`` is
bfloat16, the loss is computed in float32):

* ``resnet``: ResNet-18 for CIFAR (3x3 stem, four stages of two basic blocks, widths
  ``w, 2w, 4w, 8w``, projection shortcuts), input ``(B, 32, 32, 3)``, 10 classes, SGD with
  momentum; BatchNorm (``batch_stats`` carried) and GroupNorm variants; :data:`FULL` and
  :data:`QUICK` give the width and batch;
* ``transformer``: a pre-LN transformer block (``x + attn(norm(x))``, ``x + mlp(norm(x))``,
  a final norm, a per-token classifier), Adam; LayerNorm and RMSNorm variants;
* ``mlp``: the experiments' MLP (``experiments/models.py``: ``Dense -> norm -> relu`` for
  five hidden layers of 100, a Dense head, MNIST-shaped input, batch 100), SGD with
  momentum; BatchNorm and LayerNorm variants.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import normzoo
from benchmarks import backend
from benchmarks import layers as layer_rows
from benchmarks.harness import Group

FLAX = "flax"
TWIN_MODEL = "flax_twin"
MODES = ("x+params", "x only")
MODELS = ("resnet", "transformer", "mlp")
#: Relative tolerance of the first-step loss, normzoo against flax, per dtype.
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 2e-2}

# ------------------------------------------------------------------ (a) loss rows


def _loss(y: jax.Array, c: jax.Array) -> jax.Array:
    y32 = y.astype(jnp.float32)
    return 0.5 * jnp.sum(y32 * y32) + jnp.sum(y32 * c.astype(jnp.float32))


def _step_x(x, dx, lr):
    # One rounding to x's dtype, as in benchmarks.layers (the update is not the layer).
    return (x.astype(jnp.float32) - lr * dx.astype(jnp.float32)).astype(x.dtype)


def loss_loop(apply: layer_rows.Apply, mode: str):
    """``loop(n, lr, x, params, stats, c)`` of ``n`` descent steps on the loss."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; expected one of {MODES}")

    if mode == "x+params":
        def loop(n, lr, x, params, stats, c):
            def body(i, carry):
                x, params, stats = carry

                def f(p, x):
                    y, new_stats = apply(p, stats, x)
                    return _loss(y, c), new_stats

                (dparams, dx), stats = jax.grad(f, argnums=(0, 1), has_aux=True)(params, x)
                params = jax.tree_util.tree_map(
                    lambda p, g: (p - (lr * p.size / x.size) * g).astype(p.dtype),
                    params, dparams)
                return _step_x(x, dx, lr), params, stats

            return lax.fori_loop(0, n, body, (x, params, stats))
    else:
        def loop(n, lr, x, params, stats, c):
            def body(i, carry):
                x, stats = carry

                def f(x):
                    y, new_stats = apply(params, stats, x)
                    return _loss(y, c), new_stats

                dx, stats = jax.grad(f, has_aux=True)(x)
                return _step_x(x, dx, lr), stats

            return lax.fori_loop(0, n, body, (x, stats))

    return loop


def _check_frozen(out, args):
    lr, x = args[0], args[1]  # lr = 1 in the check run: x - x1 = dx
    x1, _ = out
    return [(x.astype(jnp.float32) - x1.astype(jnp.float32)) / lr]


def loss_implementations(variant: layer_rows.Variant, dtype: Any) -> dict[str, layer_rows.Apply]:
    out = {FLAX: layer_rows.linen_apply(layer_rows.make_module(nn, variant, dtype, True), variant)}
    for name, flag in backend.columns().items():
        module = layer_rows.make_module(normzoo, variant, dtype, True)
        out[name] = backend.traced(layer_rows.linen_apply(module, variant), flag)
    return out


def loss_groups(
    layers: Sequence[str] = layer_rows.LAYERS,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    modes: Sequence[str] = MODES,
    *,
    quick: bool = False,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> list[Group]:
    """The loss rows, in order variant x dtype x mode, on :mod:`benchmarks.layers`' shapes."""
    table = dict(layer_rows.QUICK_SHAPES if quick else layer_rows.FULL_SHAPES)
    table.update(shapes or {})
    groups = []
    for variant in layer_rows.variants(layers):
        shape = tuple(table[variant.layer])
        for dtype_name in dtypes:
            dtype = jnp.dtype(dtype_name)
            x, _, params, stats = layer_rows._inputs(variant, shape, dtype)
            c = jnp.asarray(np.random.default_rng(1).normal(0.0, 1.0, shape), dtype)
            applies = loss_implementations(variant, dtype)
            args = (jnp.float32(layer_rows.LR), x, params, stats, c)
            check_args = (jnp.float32(1.0),) + args[1:]
            for mode in modes:
                loops = {name: loss_loop(apply, mode) for name, apply in applies.items()}
                loops[layer_rows.COPY] = layer_rows.copy_loop
                loops[layer_rows.TWIN] = layer_rows.copy_loop
                full = mode == "x+params"
                groups.append(Group(
                    meta={"kind": "loss", "layer": variant.layer, "variant": variant.key,
                          "label": variant.label, "mode": mode, "shape": list(shape),
                          "dtype": dtype_name, "x_bytes": int(x.nbytes)},
                    loops=loops,
                    args=args,
                    reference=backend.DEFAULT,
                    roofline=layer_rows.COPY,
                    cache_keys={layer_rows.COPY: layer_rows.COPY,
                                layer_rows.TWIN: layer_rows.TWIN},
                    controls=(layer_rows.TWIN,),
                    check_args=check_args,
                    check_fn=layer_rows._check_backward if full else _check_frozen,
                    check_reference=FLAX,
                    carried={**{name: (1, 2, 3) if full else (1, 3) for name in applies},
                             layer_rows.COPY: (1,), layer_rows.TWIN: (1,)},
                ))
    return groups


# ------------------------------------------------------------------- (b) models


def make_norm(cls: Any, kind: str, *, train: bool, dtype: Any, name: str, groups: int = 8
              ) -> nn.Module:
    """One norm layer of class ``cls`` (flax.linen's or normzoo's, same fields)."""
    if kind == "bn":
        return cls(use_running_average=not train, momentum=0.9, dtype=dtype, name=name)
    if kind == "gn":
        return cls(num_groups=groups, dtype=dtype, name=name)
    if kind in ("ln", "rms"):
        return cls(dtype=dtype, name=name)
    raise ValueError(f"norm kind={kind!r} is unknown")


def norm_class(lib: Any, kind: str) -> Any:
    """The norm layer class of ``kind`` in ``lib`` (``flax.linen`` or ``normzoo``)."""
    names = {"bn": "BatchNorm", "gn": "GroupNorm", "ln": "LayerNorm", "rms": "RMSNorm"}
    return getattr(lib, names[kind])


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (``blocks=2`` per stage, 4 stages; fewer for smoke tests); the norm
    after every conv is ``norm_cls`` of ``norm_kind``, GroupNorm with ``min(8, width)`` groups."""

    norm_cls: Any
    norm_kind: str
    width: int = 16
    blocks: int = 2
    stages: int = 4
    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        groups = min(8, self.width)
        counter = iter(range(1000))

        def conv(h, features, kernel, stride):
            return nn.Conv(features, (kernel, kernel), (stride, stride), padding="SAME",
                           use_bias=False, dtype=self.dtype, name=f"conv{next(counter)}")(h)

        def norm(h, name):
            return make_norm(self.norm_cls, self.norm_kind, train=train, dtype=self.dtype,
                             name=name, groups=groups)(h)

        h = nn.relu(norm(conv(x.astype(self.dtype), self.width, 3, 1), "norm_stem"))
        for stage, mult in enumerate((1, 2, 4, 8)[:self.stages]):
            features = self.width * mult
            for block in range(self.blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                tag = f"s{stage}b{block}"
                y = nn.relu(norm(conv(h, features, 3, stride), f"norm_{tag}a"))
                y = norm(conv(y, features, 3, 1), f"norm_{tag}b")
                if stride != 1 or h.shape[-1] != features:
                    h = norm(conv(h, features, 1, stride), f"norm_{tag}p")
                h = nn.relu(h + y)
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h)


class PreLNTransformer(nn.Module):
    """Pre-LN transformer blocks on ``(B, L, d_model)`` inputs, then a final norm and a
    per-token classifier."""

    norm_cls: Any
    norm_kind: str
    d_model: int = 256
    heads: int = 4
    mlp_ratio: int = 4
    depth: int = 1
    num_classes: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        def norm(h, name):
            return make_norm(self.norm_cls, self.norm_kind, train=train, dtype=self.dtype,
                             name=name)(h)

        h = x.astype(self.dtype)
        for i in range(self.depth):
            a = norm(h, f"norm_attn{i}")
            a = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype,
                                                name=f"attn{i}")(a, a)
            h = h + a
            m = norm(h, f"norm_mlp{i}")
            m = nn.Dense(self.mlp_ratio * self.d_model, dtype=self.dtype, name=f"up{i}")(m)
            m = nn.Dense(self.d_model, dtype=self.dtype, name=f"down{i}")(nn.gelu(m))
            h = h + m
        h = norm(h, "norm_final")
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h)


class MLP(nn.Module):
    """The experiments' MLP: ``Dense -> norm -> relu`` per hidden layer, a Dense head."""

    norm_cls: Any
    norm_kind: str
    widths: Sequence[int] = (100,) * 5
    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        h = x.reshape(x.shape[0], -1).astype(self.dtype)
        for i, width in enumerate(self.widths):
            h = nn.Dense(width, dtype=self.dtype, name=f"dense{i}")(h)
            h = make_norm(self.norm_cls, self.norm_kind, train=train, dtype=self.dtype,
                          name=f"norm{i}")(h)
            h = nn.relu(h)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model row family: how to build it, its batch and its optimizer."""

    name: str
    norm: str
    build: Callable[[Any, Any], nn.Module]  # (norm class, dtype) -> module
    input_shape: tuple[int, ...]
    label_shape: tuple[int, ...]
    num_classes: int
    optimizer: Callable[[], optax.GradientTransformation]
    describe: str

    @property
    def label(self) -> str:
        names = {"bn": "BatchNorm", "gn": "GroupNorm", "ln": "LayerNorm", "rms": "RMSNorm"}
        return f"{self.name} {names[self.norm]}"


#: Full-size settings: chosen so one float32 train step of each model takes well under a
#: second on a 2-core CPU (the slope needs several steps per timed run, and each of the
#: four columns of a ResNet row is one long compilation).
FULL = {"resnet": dict(width=16, batch=16, blocks=2, stages=4),
        "transformer": dict(batch=8, seq=128, d_model=256, heads=4),
        "mlp": dict(batch=100, width=100, features=784)}
#: ``--quick`` settings: tiny widths and batches, and a ResNet of two stages of one block
#: (compilation, not arithmetic, is what a smoke test of these rows spends its time on).
QUICK = {"resnet": dict(width=4, batch=4, blocks=1, stages=2),
         "transformer": dict(batch=2, seq=16, d_model=32, heads=4),
         "mlp": dict(batch=16, width=16, features=64)}


#: Norm variants per model; ``--quick`` times the first of each.
NORMS = {"resnet": ("bn", "gn"), "transformer": ("ln", "rms"), "mlp": ("bn", "ln")}


def model_specs(models: Sequence[str] = MODELS, *, quick: bool = False,
                sizes: dict[str, dict[str, int]] | None = None,
                norms: dict[str, Sequence[str]] | None = None) -> list[ModelSpec]:
    """The model rows: every norm of :data:`NORMS` (``norms`` overrides per model)."""
    table = {k: dict(v) for k, v in (QUICK if quick else FULL).items()}
    for k, v in (sizes or {}).items():
        table[k].update(v)
    specs = []
    for model in models:
        if model not in MODELS:
            raise ValueError(f"model={model!r} is unknown; expected one of {MODELS}")
        s = table[model]
        kinds = tuple((norms or {}).get(model, NORMS[model]))
        if quick and not (norms and model in norms):
            kinds = kinds[:1]
        if model == "resnet":
            for kind in kinds:
                specs.append(ModelSpec(
                    "resnet", kind,
                    lambda cls, dtype, kind=kind, s=s: ResNet18(
                        cls, kind, width=s["width"], blocks=s["blocks"], stages=s["stages"],
                        dtype=dtype),
                    (s["batch"], 32, 32, 3), (s["batch"],), 10,
                    lambda: optax.sgd(0.01, momentum=0.9),
                    f"ResNet-{2 + 2 * s['blocks'] * s['stages']}, width {s['width']}, "
                    f"batch {s['batch']}x32x32x3, "
                    "SGD momentum"))
        elif model == "transformer":
            for kind in kinds:
                specs.append(ModelSpec(
                    "transformer", kind,
                    lambda cls, dtype, kind=kind, s=s: PreLNTransformer(
                        cls, kind, d_model=s["d_model"], heads=s["heads"], dtype=dtype),
                    (s["batch"], s["seq"], s["d_model"]), (s["batch"], s["seq"]), 256,
                    lambda: optax.adam(1e-3),
                    f"pre-LN block, batch {s['batch']}, seq {s['seq']}, d_model "
                    f"{s['d_model']}, {s['heads']} heads, MLP 4x, 256-way head, Adam"))
        else:
            for kind in kinds:
                specs.append(ModelSpec(
                    "mlp", kind,
                    lambda cls, dtype, kind=kind, w=s["width"]: MLP(cls, kind, widths=(w,) * 5,
                                                                    dtype=dtype),
                    (s["batch"], s["features"]), (s["batch"],), 10,
                    lambda: optax.sgd(0.01, momentum=0.9),
                    f"{s['features']} -> {s['width']} x 5 -> 10, batch {s['batch']}, "
                    "SGD momentum"))
    return specs


def train_step(model: nn.Module, tx: optax.GradientTransformation, stateful: bool):
    """``step(params, batch_stats, opt_state, x, labels) -> (params, batch_stats, opt_state,
    loss)``: softmax cross-entropy in float32, one optax update."""

    def loss_fn(params, batch_stats, x, labels):
        if stateful:
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                          train=True, mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        else:
            logits = model.apply({"params": params}, x, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels).mean()
        return loss, batch_stats

    def step(params, batch_stats, opt_state, x, labels):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step


def train_loop(step):
    """``loop(n, params, batch_stats, opt_state, loss, x, labels)``: ``n`` train steps on one
    batch; the carried ``loss`` is the last step's (after one step: the first step's loss)."""

    def loop(n, params, batch_stats, opt_state, loss, x, labels):
        def body(i, carry):
            params, batch_stats, opt_state, _ = carry
            return step(params, batch_stats, opt_state, x, labels)

        return lax.fori_loop(0, n, body, (params, batch_stats, opt_state, loss))

    return loop


def init_variables(flax_model: nn.Module, zoo_model: nn.Module, x: jax.Array, *, row: str,
                   seed: int = 0) -> dict[str, Any]:
    """The variables both models start from, drawn once in NumPy.

    Both models must declare the same variables (names, shapes, dtypes: checked with
    ``jax.eval_shape``, which compiles nothing); they are then given the same values:
    kernels ``N(0, 1 / fan_in)`` (``fan_in`` = all axes but the last), biases and running
    means 0, scales and running variances 1, as flax's defaults up to the kernels' law.
    Running ``init`` itself would trace and compile each model's forward pass once more,
    which costs more than the timed loops' compilation on a small CPU.
    """
    key = jax.random.PRNGKey(seed)
    shapes = jax.eval_shape(lambda k: flax_model.init(k, x, train=True), key)
    zoo_shapes = jax.eval_shape(lambda k: zoo_model.init(k, x, train=True), key)
    if jax.tree_util.tree_map(str, shapes) != jax.tree_util.tree_map(str, zoo_shapes):
        raise AssertionError(f"{row}: flax and normzoo declare different variables")
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "kernel" in name:
            fan_in = max(1, int(np.prod(leaf.shape[:-1])))
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), leaf.shape)
        elif "scale" in name or "var" in name:
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


class FirstStepCheck:
    """``check_fn`` for a train group: the first step's loss of every column against flax's.

    The harness calls it once per compiled loop after one iteration, in the group's loop
    order (flax first) and before any timing; a column whose loss differs from flax's by more
    than ``rtol`` stops the run with an AssertionError naming the row and the losses.
    """

    def __init__(self, row: str, rtol: float):
        self.row, self.rtol = row, rtol
        self.losses: list[float] = []

    def __call__(self, out, args):
        loss = float(out[3])
        self.losses.append(loss)
        first = self.losses[0]
        if not np.isfinite(loss) or abs(loss - first) > self.rtol * max(abs(first), 1e-30):
            raise AssertionError(
                f"{self.row}: first-step loss {loss!r} differs from flax's {first!r} by more "
                f"than {self.rtol:g} relative (losses in loop order: {self.losses})")
        return [out[3]]


def train_groups(
    models: Sequence[str] = MODELS,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    *,
    quick: bool = False,
    sizes: dict[str, dict[str, int]] | None = None,
    norms: dict[str, Sequence[str]] | None = None,
    twin: bool = True,
) -> list[Group]:
    """The train-step rows, in order model x norm x dtype.

    ``twin=False`` leaves out the flax twin (the noise control): each column of a model
    costs one compilation, which is most of a smoke test's time; without the twin a row's
    ratios are judged against no noise of its own.
    """
    groups = []
    for spec in model_specs(models, quick=quick, sizes=sizes, norms=norms):
        rng = np.random.default_rng(0)
        x_full = jnp.asarray(rng.normal(0.0, 1.0, spec.input_shape), jnp.float32)
        labels = jnp.asarray(rng.integers(0, spec.num_classes, spec.label_shape), jnp.int32)
        stateful = spec.norm == "bn"
        for dtype_name in dtypes:
            dtype = jnp.dtype(dtype_name)
            # The batch is given in the compute dtype, as an input pipeline would feed it.
            x = x_full.astype(dtype)
            flax_model = spec.build(norm_class(nn, spec.norm), dtype)
            zoo_model = spec.build(norm_class(normzoo, spec.norm), dtype)
            row = f"{spec.label} {dtype_name}"
            variables = init_variables(flax_model, zoo_model, x, row=row)
            tx = spec.optimizer()
            params = variables["params"]
            batch_stats = variables.get("batch_stats", {})
            opt_state = tx.init(params)
            loops = {FLAX: train_loop(train_step(flax_model, tx, stateful))}
            for name, flag in backend.columns().items():
                loops[name] = backend.traced(train_loop(train_step(zoo_model, tx, stateful)),
                                             flag)
            if twin:
                loops[TWIN_MODEL] = train_loop(train_step(flax_model, tx, stateful))
            groups.append(Group(
                meta={"kind": "train", "model": spec.name, "norm": spec.norm,
                      "label": spec.label, "describe": spec.describe,
                      "shape": list(spec.input_shape), "dtype": dtype_name},
                loops=loops,
                args=(params, batch_stats, opt_state, jnp.float32(0.0), x, labels),
                reference=backend.DEFAULT,
                roofline=None,
                controls=(TWIN_MODEL,) if twin else (),
                check_fn=FirstStepCheck(row, LOSS_RTOL[dtype_name]),
                check_reference=FLAX,
                carried={name: (0, 1, 2, 3) for name in loops},
            ))
    return groups
