"""normzoo comparison experiments: the seed articles' claims as reproducible runs.

Run ``python -m experiments --help``. Package layout:

* :mod:`experiments.data` - datasets (digits, mnist1d, local mnist/fashion_mnist/cifar10 files)
* :mod:`experiments.models` - MLP / CNN / ResNet taking any ``normzoo.registry`` normalizer
* :mod:`experiments.train` - jitted train step with ``batch_stats``, vmapped over runs
* :mod:`experiments.store` - atomic writes, cache of finished jobs (resume)
* :mod:`experiments.common` - options, jobs, claims, metrics files
* :mod:`experiments.suites` - one module per suite
* :mod:`experiments.report`, :mod:`experiments.plots` - report.md / report.html and figures
"""
