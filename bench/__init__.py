"""tunefarm's benchmarks: run each as ``python -m bench.NAME`` from the repository root (``--help`` says
what it measures). Results land in bench/results/; :mod:`bench.common` is the one place that describes the
machine a result was measured on."""
