"""Training engine: a jitted train step carrying ``batch_stats``, vmapped over runs.

One *job* trains ``K`` runs that share a model architecture and static settings (optimizer kind,
batch size, epochs) but may differ in per-run scalars: seed, learning rate, weight decay, init
std and dropout rate. Those scalars live inside the train state (the learning rate through
``optax.inject_hyperparams``), so ``jax.vmap`` trains all ``K`` runs with one compiled epoch.

* :func:`make_train_step` returns the plain per-run step ``(state, (x, y)) -> (state, metrics)``.
  It contains no device-specific code: a batch sharded over a ``jax.sharding.Mesh`` along its
  leading axis (data parallel) passes through ``jax.jit(train_step)`` unchanged, and XLA makes the
  BatchNorm statistics global. With ``axis_name`` it is the per-device step of a ``shard_map``
  (per-device statistics; gradients, metrics and running statistics averaged over devices).
* :func:`train_job` runs the epochs: per epoch one call of ``jit(vmap(scan(train_step)))``, then an
  evaluation with running statistics on train / val / test, optional probes, a progress update
  and, every ``checkpoint_every`` seconds, a checkpoint so an interrupted job resumes where it
  stopped with identical numbers. With ``parallel`` (a :class:`~experiments.distributed.DataParallel`)
  the epoch is :func:`make_parallel_epoch_fn` over a device mesh, the state replicated and every
  batch split over the devices; evaluation chunks are split the same way.

Both model APIs share this engine: a Linen module, or an NNX model wrapped functionally by
:class:`experiments.nnx_models.NNXModel` (``apply`` with Linen's signature over the NNX state);
the NNX state starts from the Linen twin's variables, so both give the same numbers per seed.

Randomness: run ``seed`` gives the init key, the data-order key and the dropout key; they do not
depend on the other runs in the job, so results do not depend on how runs are grouped, and two
normalizers compared with the same seed see the same initial draws and the same batches.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from experiments.data import Dataset
from experiments.distributed import AXIS, DataParallel, all_processes
from experiments.models import is_norm_param, scale_init
from experiments.nnx_models import NNXModel
from experiments.store import atomic_write_bytes, atomic_write_json, read_json, writes_enabled

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
_INIT, _DATA, _DROPOUT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Static training settings shared by the runs of a job.

    Attributes:
      optimizer: ``sgd``, ``momentum`` (SGD with momentum ``momentum``), ``adam`` or ``adamw``.
      batch_size: examples per step; the last incomplete batch of an epoch is dropped.
      epochs: number of passes over the training set.
      init: kernel init, ``he``, ``xavier`` or ``std`` (use the per-run ``init_std``).
      weight_decay_mode: ``l2`` (0.5 * wd * ||W||^2 added to the loss, kernels only) or
        ``decoupled`` (``wd * lr * W`` subtracted each step, as AdamW).
      momentum: momentum of the ``momentum`` optimizer.
      eval_chunk: evaluation batch size (padding is masked out).
      train_eval_max: evaluate train accuracy on at most this many training samples.
    """

    optimizer: str = "sgd"
    batch_size: int = 100
    epochs: int = 20
    init: str = "he"
    weight_decay_mode: str = "l2"
    momentum: float = 0.9
    eval_chunk: int = 512
    train_eval_max: int = 5000

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is unknown; expected one of {list(OPTIMIZERS)}")
        if self.weight_decay_mode not in ("l2", "decoupled"):
            raise ValueError(f"weight_decay_mode={self.weight_decay_mode!r}; expected 'l2' or 'decoupled'")
        if self.batch_size < 1 or self.epochs < 0:
            raise ValueError(f"batch_size={self.batch_size}, epochs={self.epochs}: expected >= 1 and >= 0")


@dataclasses.dataclass(frozen=True)
class Run:
    """Per-run scalars of one training run (all may differ inside one vmapped job)."""

    seed: int = 0
    lr: float = 0.01
    weight_decay: float = 0.0
    init_std: float = 1.0
    dropout: float = 0.0
    affine: float = 1.0  # 0: normalizer parameters (scale/shift) frozen at their initial values


class TrainState(train_state.TrainState):
    """Flax ``TrainState`` plus running statistics and the per-run randomness and scalars.

    ``batch_stats`` is ``{}`` for models without stateful normalizers. ``hparams`` holds ``l2``
    (coefficient of the L2 loss term) and ``dropout`` (rate) as float32 scalars.
    """

    batch_stats: Any
    hparams: dict[str, jax.Array]
    dropout_key: jax.Array


def _decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: getattr(p[-1], "key", None) == "kernel", params)


def make_optimizer(spec: TrainSpec) -> optax.GradientTransformation:
    """The optax transformation for ``spec``; learning rate and weight decay are injected hyper-
    parameters stored in the optimizer state, so they can differ per run under ``vmap``.

    Cached per (optimizer, momentum, weight-decay mode), so jobs that differ only in batch size or
    epochs get the same object and share compiled functions."""
    return _make_optimizer(spec.optimizer, spec.momentum, spec.weight_decay_mode)


@functools.lru_cache(maxsize=None)
def _make_optimizer(optimizer: str, momentum: float, weight_decay_mode: str) -> optax.GradientTransformation:
    spec = TrainSpec(optimizer=optimizer, momentum=momentum, weight_decay_mode=weight_decay_mode)
    decoupled = spec.weight_decay_mode == "decoupled" or spec.optimizer == "adamw"

    def factory(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
        if spec.optimizer == "sgd":
            base = optax.sgd(learning_rate)
        elif spec.optimizer == "momentum":
            base = optax.sgd(learning_rate, momentum=spec.momentum)
        elif spec.optimizer == "adam":
            base = optax.adam(learning_rate)
        else:
            return optax.adamw(learning_rate, weight_decay=weight_decay, mask=_decay_mask)
        if decoupled:
            # decay scaled by the learning rate, applied beside the (adaptive) update
            return optax.chain(base, optax.add_decayed_weights(-learning_rate * weight_decay, mask=_decay_mask))
        return base

    return optax.inject_hyperparams(factory)(learning_rate=0.0, weight_decay=0.0)


def init_variables(model: nn.Module, sample_x: jax.Array) -> dict[str, Any]:
    """Variables of ``model`` (params and, for stateful normalizers, ``batch_stats``) on the host.

    This template only provides shapes and the deterministic initial values of biases and
    normalizer parameters (kernels are redrawn per run by :func:`draw_kernels`), so it uses a cheap
    ``rbg`` key, is compiled at XLA optimization level 0 (it runs once) and is cached per model.
    """
    cache_key = (model, tuple(sample_x.shape[1:]), str(sample_x.dtype))
    if cache_key not in _TEMPLATES:
        key = jax.random.key(0, impl="rbg")
        fn = jax.jit(lambda k, x: model.init({"params": k, "dropout": k}, x, train=False))
        compiled = fn.lower(key, sample_x).compile(compiler_options={"xla_backend_optimization_level": 0})
        _TEMPLATES[cache_key] = jax.device_get(flax.core.unfreeze(compiled(key, sample_x)))
    return _TEMPLATES[cache_key]


_TEMPLATES: dict[Any, dict[str, Any]] = {}


def draw_kernels(template: Any, seed: int) -> Any:
    """Replace every ``kernel`` leaf of ``template`` by N(0, 1) draws from numpy's PCG64 seeded with
    ``(seed, 0)``; other leaves are kept. Deterministic in ``seed`` and the tree layout only."""
    rng = np.random.default_rng([seed, _INIT])

    def draw(path: tuple[Any, ...], leaf: np.ndarray) -> np.ndarray:
        if getattr(path[-1], "key", None) == "kernel":
            return rng.standard_normal(leaf.shape).astype(leaf.dtype)
        return np.asarray(leaf)

    return jax.tree_util.tree_map_with_path(draw, template)


def create_state(model: Any, spec: TrainSpec, variables: dict[str, Any], run: dict[str, jax.Array]) -> TrainState:
    """Build one run's state from its variables (kernels N(0, 1), rescaled here per ``spec.init``)
    and its scalars ``run`` (fields of :class:`Run`, possibly traced under ``vmap``).

    ``apply_fn`` is ``model.apply``: Linen's, or for an NNX model the functional
    :meth:`~experiments.nnx_models.NNXModel.apply` (``nnx.merge`` of the state, call, new
    ``nnx.BatchStat`` state), so one train step, optimizer and evaluation serve both APIs."""
    params = scale_init(variables["params"], spec.init, run["init_std"])
    l2_mode = spec.weight_decay_mode == "l2" and spec.optimizer != "adamw"
    state = TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=make_optimizer(spec),
        batch_stats=variables.get("batch_stats", {}),
        hparams={
            "l2": jnp.asarray(run["weight_decay"] if l2_mode else 0.0, jnp.float32),
            "dropout": jnp.asarray(run["dropout"], jnp.float32),
            "affine": jnp.asarray(run["affine"], jnp.float32),
        },
        dropout_key=jax.random.fold_in(jax.random.PRNGKey(run["seed"]), _DROPOUT),
    )
    hyper = {
        "learning_rate": jnp.asarray(run["lr"], jnp.float32),
        "weight_decay": jnp.asarray(0.0 if l2_mode else run["weight_decay"], jnp.float32),
    }
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def init_states(model: Any, spec: TrainSpec, sample_x: np.ndarray, runs: Sequence[Run]) -> TrainState:
    """Stacked states of ``runs`` (leading axis ``K = len(runs)``).

    An NNX model (:class:`~experiments.nnx_models.NNXModel`) starts from the variables its Linen
    twin would start from (same template, same kernel draws), copied into its NNX state, so both
    APIs train from identical values."""
    nnx_model = isinstance(model, NNXModel)
    template = init_variables(model.linen if nnx_model else model, jnp.asarray(sample_x))
    per_run = [{**template, "params": draw_kernels(template["params"], r.seed)} for r in runs]
    if nnx_model:
        per_run = [jax.device_get(model.from_linen(v, sample_x.shape[1:])) for v in per_run]
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *per_run)
    build = jax.vmap(lambda v, r: create_state(model, spec, v, r))
    return build(stacked, _stack_runs(runs))


def batch_order(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """Indices ``(n // batch_size, batch_size)`` of one epoch's batches for run ``seed``: a
    permutation from PCG64 seeded with ``(seed, 1, epoch)``; the incomplete last batch is dropped."""
    steps = n // batch_size
    perm = np.random.default_rng([seed, _DATA, epoch]).permutation(n)
    return perm[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def l2_penalty(params: Any) -> jax.Array:
    """Sum of squared kernel entries (biases and normalizer parameters excluded)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum((jnp.sum(v**2) for p, v in leaves if getattr(p[-1], "key", None) == "kernel"), jnp.float32(0.0))


def make_train_step(
    axis_name: str | None = None,
) -> Callable[[TrainState, tuple[jax.Array, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Return ``train_step(state, (x, y)) -> (state, {'loss', 'acc'})`` for one run.

    ``x``: ``(B, *input_shape)`` float32, ``y``: ``(B,)`` int32. The loss is mean softmax cross
    entropy plus ``0.5 * l2 * ||W||^2``; ``metrics['loss']`` is the cross entropy alone. With
    ``hparams['affine'] == 0`` the normalizers' own parameters get zero gradients (no learned
    scale and shift: gamma = 1, beta = 0 stay fixed). Running
    statistics are updated through ``mutable=['batch_stats']``. Batch-wide reductions are plain
    ``mean`` calls, so a batch sharded along axis 0 gives the same result as an unsharded one.

    ``axis_name``: the step of one device inside ``shard_map`` over that axis, ``x`` its own rows
    (the same number on every device). Normalizers use this device's statistics; gradients, the
    new running statistics and the metrics are ``pmean`` -ed over the axis, so the state stays
    replicated (the loss is the global batch's mean because the shards are equal). The dropout
    key is folded with the device index, so devices draw independent masks. ``None``: no
    collective (the one-device step, unchanged).
    """
    def train_step(state: TrainState, batch: tuple[jax.Array, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        x, y = batch
        key = jax.random.fold_in(state.dropout_key, state.step)
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Any]]:
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats},
                x,
                train=True,
                dropout_rate=state.hparams["dropout"],
                rngs={"dropout": key},
                mutable=["batch_stats"],
            )
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce + 0.5 * state.hparams["l2"] * l2_penalty(params), (ce, logits, updates)

        grads, (ce, logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
        affine = state.hparams["affine"]
        grads = jax.tree_util.tree_map_with_path(lambda p, g: g * affine if is_norm_param(p) else g, grads)
        batch_stats = updates.get("batch_stats", state.batch_stats)
        metrics = {"loss": ce, "acc": jnp.mean(jnp.argmax(logits, -1) == y)}
        if axis_name is not None:
            grads, batch_stats, metrics = jax.lax.pmean((grads, batch_stats, metrics), axis_name)
        new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        return new_state, metrics

    return train_step


@functools.lru_cache(maxsize=None)
def make_epoch_fn() -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``epoch_fn(states, x, y, order) -> (states, {'loss': (K,), 'acc': (K,)})``: one epoch of
    ``K`` vmapped runs. ``x``, ``y``: the whole training set (shared); ``order``: ``(K, steps, B)``
    batch indices per run (see :func:`batch_order`). Metrics are means over the epoch's steps."""
    step = make_train_step()

    def one(state: TrainState, x: jax.Array, y: jax.Array, order: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        state, metrics = jax.lax.scan(lambda s, idx: step(s, (x[idx], y[idx])), state, order)
        return state, jax.tree_util.tree_map(jnp.mean, metrics)

    return jax.jit(jax.vmap(one, in_axes=(0, None, None, 0)), donate_argnums=0)


@functools.lru_cache(maxsize=None)
def make_parallel_epoch_fn(parallel: DataParallel, batch_size: int) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``epoch_fn(states, xb, yb) -> (states, {'loss': (K,), 'acc': (K,)})``: one epoch of ``K``
    vmapped runs over ``parallel`` 's mesh, the data-parallel twin of :func:`make_epoch_fn`.

    ``states``: replicated. ``xb``: ``(K, steps, B', *input_shape)``, ``yb``: ``(K, steps, B')``,
    the epoch's batches split over the devices along axis 2 (``B' = parallel.padded(batch_size)``,
    from :meth:`~experiments.distributed.DataParallel.batches`). Returns replicated outputs.

    * sync: ``jit(vmap(scan(train_step)))`` on the sharded batches. Each step keeps the first
      ``batch_size`` rows (the padding goes) and asks for them split over the devices; XLA then
      computes every batch-wide reduction (statistics, loss, gradients) over exactly those rows,
      whether or not ``batch_size`` divides by the device count.
    * per-device: ``shard_map`` over the data axis of ``vmap(scan(train_step(axis_name)))``; each
      device trains on its ``batch_size / N`` rows with its own statistics, and the averaged
      updates keep the state replicated.
    """
    mesh, rep = parallel.mesh, parallel.replicated
    if parallel.sync:
        step = make_train_step()
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))

        def body(state: TrainState, batch: tuple[jax.Array, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
            x, y = (jax.lax.with_sharding_constraint(a[:batch_size], rows) for a in batch)
            return step(state, (x, y))
    else:
        body = make_train_step(AXIS)

    def one(state: TrainState, xb: jax.Array, yb: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        state, metrics = jax.lax.scan(body, state, (xb, yb))
        return state, jax.tree_util.tree_map(jnp.mean, metrics)

    epoch = jax.vmap(one)
    if not parallel.sync:
        spec = jax.sharding.PartitionSpec(None, None, AXIS)
        # check_vma=False: the gradients stay per device (no implicit sum over the replicated
        # params' uses) and train_step averages them itself, as under pmap
        epoch = jax.shard_map(epoch, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(), spec, spec),
                              out_specs=jax.sharding.PartitionSpec(), check_vma=False)
    return jax.jit(epoch, out_shardings=(rep, rep), donate_argnums=0)


def forward(state: TrainState, x: jax.Array, *, batch_stats_mode: bool = False, collect: bool = False) -> Any:
    """Inference forward of one run: running statistics, or (``batch_stats_mode``) the statistics
    of ``x`` itself with the stored running statistics left untouched. With ``collect`` also
    returns the sown intermediates ``{name: array}``."""
    mutable = (["batch_stats"] if batch_stats_mode else []) + (["intermediates"] if collect else [])
    out = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        x,
        train=batch_stats_mode,
        dropout_rate=0.0,
        rngs={"dropout": state.dropout_key},
        mutable=mutable if mutable else False,
    )
    if not mutable:
        return out
    logits, cols = out
    if not collect:
        return logits
    inter = {k: v[0] for k, v in flax.core.unfreeze(cols.get("intermediates", {})).items()}
    return logits, inter


@functools.lru_cache(maxsize=None)
def make_eval_fn(batch_stats_mode: bool = False,
                 parallel: DataParallel | None = None) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """``eval_fn(states, x, y, w) -> (loss_sum (K,), correct_sum (K,))`` for one chunk; ``w`` is a
    0/1 mask of valid rows (padding). With ``parallel`` the outputs are replicated over its mesh
    (the chunk may be split over the devices: with running statistics each row is independent)."""

    def one(state: TrainState, x: jax.Array, y: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = forward(state, x, batch_stats_mode=batch_stats_mode)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(w * ce), jnp.sum(w * (jnp.argmax(logits, -1) == y))

    if parallel is not None:
        return jax.jit(jax.vmap(one, in_axes=(0, None, None, None)), out_shardings=parallel.replicated)
    return jax.jit(jax.vmap(one, in_axes=(0, None, None, None)))


def evaluate(
    eval_fn: Callable[..., tuple[jax.Array, jax.Array]],
    states: TrainState,
    x: np.ndarray,
    y: np.ndarray,
    chunk: int,
    *,
    drop_remainder: bool = False,
    put: Callable[[np.ndarray], jax.Array] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean loss and accuracy per run, ``(K,)`` each, over ``x`` in chunks of ``chunk`` rows.

    The last chunk is zero-padded and masked, or dropped with ``drop_remainder`` (needed when the
    normalizer uses the statistics of the evaluation batch itself). ``put`` places each chunk's
    host arrays (e.g. split over a mesh: :meth:`~experiments.distributed.DataParallel.put_rows`).
    """
    n = len(y)
    if drop_remainder:
        n = (n // chunk) * chunk
        if n == 0:
            raise ValueError(f"evaluation chunk={chunk} exceeds the {len(y)} samples")
    loss = correct = 0.0
    for start in range(0, n, chunk):
        xb, yb = x[start : start + chunk], y[start : start + chunk]
        m = len(yb)
        w = np.zeros(chunk, np.float32)
        w[:m] = 1.0
        if m < chunk:
            xb = np.concatenate([xb, np.zeros((chunk - m, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(chunk - m, yb.dtype)])
        if put is not None:
            xb, yb, w = put(xb), put(yb), put(w)
        ls, cs = eval_fn(states, xb, yb, w)
        loss, correct = loss + np.asarray(ls, np.float64), correct + np.asarray(cs, np.float64)
    return np.asarray(loss / n), np.asarray(correct / n)


Probe = Callable[[TrainState, jax.Array], dict[str, jax.Array]]


@dataclasses.dataclass
class JobResult:
    """Per-run records (JSON-ready) and, when trained in this process, the final states."""

    records: list[dict[str, Any]]
    states: TrainState | None
    seconds: float


def _stack_runs(runs: Sequence[Run]) -> dict[str, jax.Array]:
    return {
        "seed": jnp.asarray([r.seed for r in runs], jnp.uint32),
        "lr": jnp.asarray([r.lr for r in runs], jnp.float32),
        "weight_decay": jnp.asarray([r.weight_decay for r in runs], jnp.float32),
        "init_std": jnp.asarray([r.init_std for r in runs], jnp.float32),
        "dropout": jnp.asarray([r.dropout for r in runs], jnp.float32),
        "affine": jnp.asarray([r.affine for r in runs], jnp.float32),
    }


def train_job(
    model: Any,
    spec: TrainSpec,
    data: Dataset,
    runs: Sequence[Run],
    *,
    probe: Probe | None = None,
    probe_x: np.ndarray | None = None,
    after: Callable[[TrainState], list[dict[str, Any]]] | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: float = 30.0,
    on_epoch: Callable[[int], None] | None = None,
    parallel: DataParallel | None = None,
) -> JobResult:
    """Train ``runs`` of ``model`` jointly (vmapped) and record per-epoch metrics.

    Args:
      model: a Linen module called as ``model(x, train=..., dropout_rate=...)``, or an
        :class:`~experiments.nnx_models.NNXModel` (``build_model(..., api="nnx")``).
      spec: static training settings.
      data: the dataset; the test split is evaluated and recorded, never used to select.
      runs: per-run scalars.
      probe: ``probe(state, probe_x) -> {name: array}`` for one run, called (vmapped) after every
        epoch and before training (epoch 0); results stored per epoch under ``record['probes']``.
      after: ``after(states) -> [extra dict per run]`` called once after training;
        stored under ``record['extra']``.
      checkpoint: file for periodic checkpoints; if it exists, training resumes from it.
      checkpoint_every: seconds between checkpoints (0 = every epoch).
      on_epoch: callback after each finished epoch (progress bars, tests).
      parallel: train data-parallel over this mesh (see :mod:`experiments.distributed`); ``None``:
        one device. ``probe`` runs on the replicated state; ``after`` and the returned states get
        an ordinary single-device copy. In a multi-process run every process calls this with the
        same arguments; a checkpoint resumes only when every process can read it.

    Returns:
      A :class:`JobResult`. Each record has ``history`` (one dict per epoch 0..E with
      ``train_loss`` (mean training-mode loss of the epoch), ``train_acc``, ``val_loss``,
      ``val_acc``, ``test_loss``, ``test_acc``), ``diverged`` (non-finite training loss) and
      ``diverged_epoch``.
    """
    t0 = time.perf_counter()
    k = len(runs)
    if parallel is None:  # the whole training set on the device; batches are gathered in the step
        x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    train_eval = (data.x_train[: spec.train_eval_max], data.y_train[: spec.train_eval_max])
    n_train = len(data.y_train)
    if n_train < spec.batch_size:
        raise ValueError(f"batch_size={spec.batch_size} exceeds the {n_train} training samples")
    states = init_states(model, spec, data.x_train[:2], runs)
    chunk = min(spec.eval_chunk, max(len(data.y_train), len(data.y_val), len(data.y_test)))
    put = probe_x_dev = None
    if parallel is None:
        epoch_fn = make_epoch_fn()
        eval_fn = make_eval_fn()
        probe_fn = jax.jit(jax.vmap(probe, in_axes=(0, None))) if probe is not None else None
    else:
        parallel.check_batch(spec.batch_size)
        states = parallel.replicate(states)
        epoch_fn = make_parallel_epoch_fn(parallel, spec.batch_size)
        eval_fn = make_eval_fn(False, parallel)
        chunk, put = parallel.padded(chunk), parallel.put_rows
        probe_fn = (jax.jit(jax.vmap(probe, in_axes=(0, None)), out_shardings=parallel.replicated)
                    if probe is not None else None)
        probe_x_dev = parallel.replicate(np.asarray(probe_x)) if probe is not None else None

    history: list[list[dict[str, float]]] = [[] for _ in range(k)]
    probes: list[dict[str, list[Any]]] = [{} for _ in range(k)]
    start_epoch = 0
    resume = checkpoint is not None and checkpoint.is_file() and checkpoint.with_suffix(".json").is_file()
    if parallel is not None:
        resume = all_processes(resume)  # every process resumes, or none does
    if resume:
        meta = read_json(checkpoint.with_suffix(".json"))
        states = flax.serialization.from_bytes(states, checkpoint.read_bytes())
        if parallel is not None:
            states = parallel.replicate(states)
        history, probes, start_epoch = meta["history"], meta["probes"], meta["next_epoch"]

    def record_epoch(epoch: int, train_loss: np.ndarray) -> None:
        splits = {"train": train_eval, "val": (data.x_val, data.y_val), "test": (data.x_test, data.y_test)}
        res = {s: evaluate(eval_fn, states, xs, ys, chunk, put=put) for s, (xs, ys) in splits.items() if len(ys)}
        for i in range(k):
            row = {"epoch": epoch, "train_loss": float(train_loss[i])}
            for s, (lo, acc) in res.items():
                row[f"{s}_loss"], row[f"{s}_acc"] = float(lo[i]), float(acc[i])
            history[i].append(row)
        if probe_fn is not None:
            out = jax.device_get(probe_fn(states, jnp.asarray(probe_x) if probe_x_dev is None else probe_x_dev))
            for i in range(k):
                for name, val in out.items():
                    probes[i].setdefault(name, []).append(np.asarray(val[i]).tolist())

    if start_epoch == 0:
        record_epoch(0, np.full(k, np.nan))
        start_epoch = 1
    last_save = time.perf_counter()
    for epoch in range(start_epoch, spec.epochs + 1):
        order = np.stack([batch_order(r.seed, epoch, n_train, spec.batch_size) for r in runs])
        if parallel is None:
            states, metrics = epoch_fn(states, x_train, y_train, order)
        else:
            states, metrics = epoch_fn(states, *parallel.batches(data.x_train, data.y_train, order))
        record_epoch(epoch, np.asarray(metrics["loss"]))
        if (checkpoint is not None and writes_enabled()
                and (time.perf_counter() - last_save >= checkpoint_every or checkpoint_every <= 0)):
            atomic_write_bytes(checkpoint, flax.serialization.to_bytes(states))
            atomic_write_json(
                checkpoint.with_suffix(".json"), {"history": history, "probes": probes, "next_epoch": epoch + 1}
            )
            last_save = time.perf_counter()
        if on_epoch is not None:
            on_epoch(epoch)

    if parallel is not None:
        states = parallel.local_copy(states)
    extras: list[dict[str, Any]] = [{} for _ in range(k)]
    if after is not None:
        extras = after(states)
    records = []
    for i, run in enumerate(runs):
        bad = [h["epoch"] for h in history[i] if not np.isfinite(h["train_loss"]) and h["epoch"] > 0]
        records.append(
            {
                "run": dataclasses.asdict(run),
                "history": history[i],
                "diverged": bool(bad),
                "diverged_epoch": bad[0] if bad else None,
                "probes": probes[i],
                "extra": extras[i],
            }
        )
    if checkpoint is not None and writes_enabled():
        for p in (checkpoint, checkpoint.with_suffix(".json")):
            p.unlink(missing_ok=True)
    return JobResult(records=records, states=states, seconds=time.perf_counter() - t0)


def final(record: dict[str, Any], key: str) -> float:
    """Last-epoch value of metric ``key`` in a run record (NaN if absent)."""
    return float(record["history"][-1].get(key, float("nan")))


def iter_metric(records: Iterable[dict[str, Any]], key: str) -> np.ndarray:
    """``(n_runs, n_epochs)`` array of metric ``key``."""
    return np.asarray([[h.get(key, np.nan) for h in r["history"]] for r in records], np.float64)
