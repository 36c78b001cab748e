"""normzoo benchmarks: side-by-side speed and memory against flax.linen and a copy roofline.

Run ``python -m benchmarks`` (``--help`` for options; ``--quick`` is the CI smoke test).

Protocol (``../shared/DESIGN.md`` section 5, ``../shared/REFERENCES.md`` section 6):

* every implementation of one layer, pass, shape and dtype forms a *group*, timed in the
  same run together with a copy (``x + 1``) of the same array, the roofline;
* each implementation is compiled first (ahead of time; the compile time is reported
  apart), then timed as one jitted ``lax.fori_loop`` whose trip count is a runtime argument
  and whose output is fed back as the next input, so there is no per-call dispatch, no
  dead code to eliminate, and nothing loop-invariant to hoist except per-feature params:

  - forward:          ``x <- layer(x)`` (BN train also carries its running statistics);
  - forward+backward: ``dx, dparams = grad(sum(layer(x) * dy))``, ``x <- x - lr dx``,
    ``params <- params - lr dparams``, with ``dy`` read from memory each iteration (a
    fixed random cotangent picked by ``i % 2`` from a (2, *shape) buffer, so the backward
    reads a real ``dy`` as in a network and XLA cannot hoist any reduction of it);
  - copy:             ``x <- x + 1``;

* repeats are interleaved (the order rotates every repeat) and summarised by medians;
  ratios are ``time(other) / time(normzoo)`` (> 1: normzoo faster) and the fraction of
  copy bandwidth is ``time(copy) / time(impl)`` (1.0 = as fast as a copy);
* the temporary memory of one (un-looped) forward+backward step is read from
  ``jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes``.

Modules: :mod:`benchmarks.harness` (timing core), :mod:`benchmarks.layers` (the layer
groups), :mod:`benchmarks.whitening` (whitening rows), :mod:`benchmarks.report`
(markdown, JSON, RESULTS.md), :mod:`benchmarks.cli` (the command line),
:mod:`benchmarks.prototypes` (candidate faster implementations, measured the same way).
"""

from benchmarks.harness import Group, GroupResult, ImplResult, time_group

__all__ = ["Group", "GroupResult", "ImplResult", "time_group"]
