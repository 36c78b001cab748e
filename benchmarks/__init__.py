"""normzoo benchmarks: side-by-side speed and memory against flax.linen and a copy roofline.

Run ``python -m benchmarks`` (``--help`` for options; ``--quick`` is the CI smoke test).

Protocol (``../shared/DESIGN.md`` section 5, ``../shared/REFERENCES.md`` section 6):

* every implementation of one layer, pass, shape and dtype forms a *group*, timed in the
  same run together with a copy (``x + 1``) of the same array, the roofline, and an
  identical second copy loop (the *twin*, a timing control);
* each implementation is compiled first (ahead of time; the compile time is reported
  apart), then timed as one jitted ``lax.fori_loop`` whose trip count is a runtime argument
  and whose output is fed back as the next input, so there is no dispatch per iteration and no
  dead code to eliminate:

  - forward:          ``x <- layer(x)`` (BN train also carries its running statistics);
  - forward+backward: ``dx, dparams = grad(sum(layer(x) * dy0))``, ``x <- x - lr dx``,
    ``params <- params - lr dparams``, with one fixed random cotangent ``dy0`` read from
    memory. XLA hoists what depends on ``dy0`` alone (``sum(dy0)``, the bias gradient) out
    of the loop for every implementation alike; ways to vary ``dy`` per iteration cost
    more than the layers themselves (see :func:`benchmarks.layers.forward_backward_loop`);
  - copy:             ``x <- x + 1`` (in place: the fastest a CPU moves the data);

* the time per iteration is the slope between runs of ``n`` and ``2 n`` iterations, which
  removes what every call pays once (dispatch, loop-invariant work hoisted by XLA, first
  touch of temporary buffers, which on XLA:CPU can exceed an iteration's time), see
  :func:`benchmarks.harness.per_iteration`;
* repeats are interleaved in a new random order each round, each run starting from fresh
  copies of its carried buffers (buffer placement alone moves identical programs apart
  on CPU), and summarised by medians; ratios are ``time(other) / time(normzoo)`` (> 1:
  normzoo faster), the fraction of copy bandwidth is ``time(copy) / time(impl)`` (1.0 = as
  fast as a copy), and ``copy / twin`` shows how far apart identical programs land in this
  run: a ratio closer to 1 than the largest such gap is reported as a tie;
* the temporary memory of one (un-looped) forward+backward step is read from
  ``jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes``;
* ``jax.profiler`` traces of a loop give the time of each compiled kernel (how the
  forward/backward plans in :mod:`normzoo.functional.fused` were chosen).

Three kinds of rows (``../shared/DESIGN.md`` section 5): a layer loop with a fixed upstream
gradient (:mod:`benchmarks.layers`), a layer loop whose loss depends on y and whole train
steps of real model shapes (:mod:`benchmarks.training`); each normzoo column is traced with
the opt-in CPU kernels explicitly off (the default path) or on (:mod:`benchmarks.backend`).

Modules: :mod:`benchmarks.harness` (timing core), :mod:`benchmarks.layers` (the layer
groups), :mod:`benchmarks.training` (loss and train-step rows), :mod:`benchmarks.backend`
(the CPU kernels' switch), :mod:`benchmarks.whitening` (whitening rows), :mod:`benchmarks.report`
(markdown, JSON, RESULTS.md), :mod:`benchmarks.cli` (the command line),
:mod:`benchmarks.prototypes` (candidate faster implementations, measured the same way),
:mod:`benchmarks.bounds` and :mod:`benchmarks.floors` (how close this machine lets a forward
pass come to a copy: XLA's output half alone, and C++ kernels that do less than a layer).
"""

from benchmarks.harness import Group, GroupResult, ImplResult, time_group

__all__ = ["Group", "GroupResult", "ImplResult", "time_group"]
