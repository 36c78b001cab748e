"""Data-parallel experiments over devices and hosts: mesh, shardings, process-local data, writers.

``python -m experiments SUITE --devices N`` trains over a 1-D mesh ``Mesh(devices, ("data",))``:
the train state (params, optimizer state, ``batch_stats``) is replicated, the batch of every step
is split along its rows over the devices. :class:`DataParallel` holds the mesh and the statistics
mode; :func:`experiments.train.train_job` takes one (``parallel=``) and otherwise trains on one
device exactly as before.

Statistics:

* ``sync=True`` (``--bn-sync``, the default): plain ``jit`` over the sharded batch; XLA inserts
  the all-reduces, so batch statistics, loss and gradients are those of the global batch (the
  one-device numbers, up to float32 summation order). A batch that does not divide by the device
  count is padded to the next multiple for the transfer, and the padding rows are sliced off
  inside the step: XLA's SPMD partitioner then splits the ``B`` real rows into ``ceil(B / N)``-row
  shards (the last one shorter), padding and masking the short shard inside every reduction, so
  statistics stay exact and the padded rows never count.
* ``sync=False`` (``--no-bn-sync``): ``shard_map`` over the data axis; each device normalizes
  its ``B / N`` rows with their own statistics (ghost batches of ``B / N``), gradients, metrics
  and the new running statistics are averaged over devices (``pmean``), so the state stays
  replicated. Every device needs the same number of rows: ``B % N != 0`` is refused
  (:class:`DeviceError`).

Several hosts: :func:`initialize` calls ``jax.distributed.initialize`` (coordinator address,
process count and id from the flags, else ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID``, else JAX's cluster auto-detection: SLURM, Open MPI, Kubernetes, Cloud TPU).
Every process holds the (small, deterministic) dataset in memory and computes the same batch
order, but puts on its devices only the rows of each batch its own devices hold
(``jax.make_array_from_process_local_data``). Only process 0 writes files (see
:func:`experiments.store.set_writes`); a cached job or checkpoint is used only when every
process can read it, so all processes always run the same computations.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments import store

AXIS = "data"


class DeviceError(ValueError):
    """A device or process setting that cannot work; the message is one line naming the values."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DeviceError(f"{name}={value!r}: expected an integer") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Start ``jax.distributed`` when a multi-process run is asked for; return whether it was.

    Each argument falls back to ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``; settings still missing are left to JAX's cluster auto-detection. Nothing is
    started when none is given or the process count is 1. Must run before any JAX computation. On
    CPU, cross-process collectives use gloo. Afterwards only process 0 writes files.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if num_processes is not None and num_processes < 1:
        raise DeviceError(f"--num-processes {num_processes}: expected >= 1")
    if process_id is not None and process_id < 0:
        raise DeviceError(f"--process-id {process_id}: expected >= 0")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise DeviceError(f"--process-id {process_id} with --num-processes {num_processes}: expected an id below the count")
    if num_processes == 1 or (coordinator is None and num_processes is None and process_id is None):
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    store.set_writes(jax.process_index() == 0)
    return jax.process_count() > 1


def all_processes(flag: bool) -> bool:
    """``flag`` if every process has it true (the same answer on every process); ``flag`` itself
    in a single-process run. Used so that all processes take the same branch (cache, resume)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def device_count(devices: int | None) -> int:
    """The number of devices ``--devices`` asks for: ``None`` = every device of every process.

    Raises :class:`DeviceError` for a count below 1 or above the devices JAX sees, and, in a
    multi-process run, for any count but all devices (each process feeds its own devices)."""
    total = jax.device_count()
    n = total if devices is None else devices
    if not 1 <= n <= total:
        raise DeviceError(f"--devices {n}: expected 1 to {total} (the devices JAX sees)")
    if jax.process_count() > 1 and n != total:
        raise DeviceError(f"--devices {n}: a run over {jax.process_count()} processes uses all {total} devices")
    return n


def data_parallel(devices: int | None, sync: bool = True) -> DataParallel | None:
    """The :class:`DataParallel` for ``--devices`` / ``--bn-sync``, or ``None`` for one device
    (the single-device engine, unchanged)."""
    n = device_count(devices)
    if n == 1:
        return None
    return DataParallel(Mesh(np.asarray(jax.devices()[:n]), (AXIS,)), sync=sync)


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """A 1-D data-parallel mesh and the statistics mode (hashable: compiled functions are cached
    per instance).

    Attributes:
      mesh: ``Mesh(devices, ("data",))`` over all participating devices (process-major order).
      sync: ``True``: statistics of the global batch; ``False``: per-device statistics.
    """

    mesh: Mesh
    sync: bool = True

    @property
    def size(self) -> int:
        """Number of devices ``N``."""
        return int(self.mesh.devices.size)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def rows(self, ndim: int, axis: int = 0) -> NamedSharding:
        """Sharding of an ``ndim``-D array split over devices along ``axis``."""
        return NamedSharding(self.mesh, P(*([None] * axis), AXIS))

    def padded(self, batch: int) -> int:
        """``batch`` rounded up to a multiple of ``N`` (the transferred rows per step)."""
        return math.ceil(batch / self.size) * self.size

    def check_batch(self, batch: int) -> None:
        """Raise :class:`DeviceError` when per-device statistics cannot split ``batch`` evenly."""
        if not self.sync and batch % self.size:
            raise DeviceError(
                f"--no-bn-sync needs the batch size to divide by the device count: batch {batch}, "
                f"{self.size} devices (use --bn-sync, or a batch size or --devices that divides)")

    def _local_slice(self, shape: tuple[int, ...], axis: int) -> slice:
        """The rows of ``axis`` held by this process's devices (contiguous: process-major mesh)."""
        index = self.rows(len(shape), axis).addressable_devices_indices_map(shape)
        spans = {(s[axis].start or 0, shape[axis] if s[axis].stop is None else s[axis].stop) for s in index.values()}
        start, stop = min(a for a, _ in spans), max(b for _, b in spans)
        if sum(b - a for a, b in spans) != stop - start:
            raise DeviceError(f"this process's devices hold non-contiguous rows {sorted(spans)} of axis {axis}")
        return slice(start, stop)

    def put_rows(self, x: np.ndarray, axis: int = 0) -> jax.Array:
        """Global array of ``x`` (the same full host array on every process) split along ``axis``;
        each process transfers only its devices' rows. ``x.shape[axis]`` must divide by ``N``."""
        x = np.asarray(x)
        local = x[(slice(None),) * axis + (self._local_slice(x.shape, axis),)]
        return jax.make_array_from_process_local_data(self.rows(x.ndim, axis), local, x.shape)

    def batches(self, x: np.ndarray, y: np.ndarray, order: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """One epoch's batches ``x[order]``, ``y[order]`` as global arrays split along the batch axis.

        ``order``: ``(K, steps, B)`` row indices. Returns ``(K, steps, B', *x.shape[1:])`` and
        ``(K, steps, B')`` with ``B' = padded(B)``: rows ``B..B'-1`` repeat row 0 and are dropped
        by the step (sync mode only; :meth:`check_batch` refuses them otherwise). Each process
        gathers on the host only the rows its own devices hold."""
        k, steps, b = order.shape
        self.check_batch(b)
        pad = self.padded(b) - b
        if pad:
            order = np.concatenate([order, np.zeros((k, steps, pad), order.dtype)], axis=2)
        shape = order.shape
        local = order[:, :, self._local_slice(shape, 2)]
        xs, ys = x[local], y[local]
        return (jax.make_array_from_process_local_data(self.rows(xs.ndim, 2), xs, (*shape, *x.shape[1:])),
                jax.make_array_from_process_local_data(self.rows(ys.ndim, 2), ys, shape))

    def replicate(self, tree: Any) -> Any:
        """Every array leaf of ``tree`` (the same values on every process) as a replicated global
        array."""
        def put(leaf: Any) -> Any:
            if isinstance(leaf, jax.Array) and leaf.sharding == self.replicated:
                return leaf
            host = np.asarray(jax.device_get(leaf))
            return jax.make_array_from_process_local_data(self.replicated, host, host.shape)

        return jax.tree_util.tree_map(put, tree)

    def local_copy(self, tree: Any) -> Any:
        """``tree`` (replicated) as ordinary single-device arrays of this process, for code that
        knows nothing of the mesh (suite hooks, returned states)."""
        return jax.device_put(jax.device_get(tree), jax.local_devices()[0])

    def cache_key(self) -> dict[str, Any]:
        """What the job cache key adds for a multi-device run."""
        return {"devices": self.size, "bn_sync": self.sync}
