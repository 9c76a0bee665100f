"""How many threads TVM's CPU runtime uses: decided once, set deliberately, reported everywhere.

TVM sizes its thread pool as ``std::thread::hardware_concurrency() / 2`` on x86-64 unless
``TVM_NUM_THREADS`` is set (``MaxConcurrency()`` in its threading backend, "ignore hyper-threading"):
on a VM with one hardware thread per core that is half the cores. The farm never relies on that
default: an agent counts the cores it may run on and sets ``TVM_NUM_THREADS`` for its RPC server
before TVM's pool starts; PyTorch and ONNX Runtime baselines get the same count.
"""
from __future__ import annotations

import os
from pathlib import Path

THREADS_ENV = "TVM_NUM_THREADS"
BIND_ENV = "TVM_BIND_THREADS"
OMP_ENV = "OMP_NUM_THREADS"  # OpenMP's pool: oneDNN (Debian's libdnnl is built with OpenMP) and PyTorch


def thread_env(threads: int) -> dict[str, str]:
    """The variables that size every CPU thread pool of a process that runs TVM and vendor kernels: TVM's own
    pool (``TVM_NUM_THREADS``) and OpenMP's (``OMP_NUM_THREADS``: oneDNN's, PyTorch's). Both get ``threads``:
    a module mixing oneDNN and TVM kernels runs them one after the other in one process, each pool with the
    agent's count, never both pools' sum at once. Set before either pool starts (a child's environment).
    How long each pool's idle threads spin is left to each library's default here; a model that mixes the two
    pools gets :func:`mixed_pool_env` in its own session (the TVM runner)."""
    count = str(int(threads))
    return {THREADS_ENV: count, OMP_ENV: count}


# How long idle pool threads spin before sleeping, in a process whose model runs oneDNN (OpenMP) kernels and TVM
# kernels by turns on the same cores. By default both pools spin after their work (TVM 300000 rounds, libgomp
# ~3 ms), each on the cores the other pool needs next; with OpenMP passive and TVM spinning (what the farm set
# before), each oneDNN kernel waited for TVM's spinning workers. Measured on the 2-core AMD EPYC VM, same builds
# (ResNet-50 NCHWc, every conv on oneDNN; median of 20): TVM default + OpenMP passive 128.3 ms, both default
# 79.6, TVM 0 + OpenMP 3000 67.8; ResNet-18: 61.5 -> 34.4 ms. An all-TVM build is left at TVM's default (its
# parallel loops follow one another and spinning spares each a wake-up). GOMP_SPINCOUNT overrides
# OMP_WAIT_POLICY in libgomp (Debian's oneDNN is built with GCC's OpenMP); ~100000 rounds a millisecond.
TVM_SPIN_ENV = "TVM_THREAD_POOL_SPIN_COUNT"
GOMP_SPIN_ENV = "GOMP_SPINCOUNT"
MIXED_POOLS = {TVM_SPIN_ENV: "0", GOMP_SPIN_ENV: "3000"}
# A oneDNN model's idle spins, as a TVM row may ask for them (option ``pool_spin``): MIXED_POOLS, or the libraries'
# own; placement probes a build both ways, in this order (host/placement/evaluation.probe_spins).
POOL_SPINS = ("mixed", "stock")


def mixed_pool_env(environ=None) -> dict[str, str]:
    """The spin settings (:data:`MIXED_POOLS`) for a process about to run a model with oneDNN and TVM kernels,
    each kept where ``environ`` (default: this process's) already sets it. They must be in the environment
    before libgomp loads (it reads them once) and before TVM's pool first runs."""
    environ = os.environ if environ is None else environ
    return {name: environ.get(name, value) for name, value in MIXED_POOLS.items()}


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask: ``taskset`` and containers count), for
    process pools such as the builder's; ``os.cpu_count()`` counts the machine's, pinned or not."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def confined(cpus=None) -> bool:
    """Whether ``cpus`` (default: this process's affinity mask) are fewer than the machine's CPUs."""
    try:
        mask = set(cpus) if cpus is not None else os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return False
    return 0 < len(mask) < (os.cpu_count() or 0)


def keep_tvm_threads_inside(env, cpus=None):
    """``env`` (a mapping, changed in place and returned) for a TVM process confined to ``cpus`` (default:
    this process's mask): ``TVM_BIND_THREADS=0`` where they are fewer than the machine's, unless set.

    TVM's thread pool binds its threads to CPUs it picks from the whole machine, not from the process's
    affinity mask: a process under ``taskset -c 0`` with 2 threads has its main thread widened to every CPU
    and its pool thread bound to CPU 1 (checked here, TVM 0.27; tests/test_threads.py). On the lent 16-core
    host every pinned 2-thread measuring agent then ran half of each kernel on the same CPU, and honest
    agents disagreed by 10x and were flagged. Unbound, the threads stay inside the mask."""
    if confined(cpus):
        env.setdefault(BIND_ENV, "0")
    return env


def core_of(cpu: int) -> tuple[str, str]:
    """The physical core CPU ``cpu`` is a hardware thread of: (package, core_id), or ("cpu", N) where the
    kernel gives no topology (not Linux, odd kernel: one core per CPU)."""
    topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        return (topo.joinpath("physical_package_id").read_text().strip(),
                topo.joinpath("core_id").read_text().strip())
    except OSError:
        return ("cpu", str(cpu))


def core_order(cpus) -> list[int]:
    """``cpus`` ordered by physical core, a core's hardware threads side by side: slices of it a whole number of
    cores long share no core (SMT siblings are often numbered N and N + cores/2, so the plain order would give
    two slices the halves of one core)."""
    firsts: dict[tuple[str, str], int] = {}
    for cpu in sorted(cpus):
        firsts.setdefault(core_of(cpu), cpu)
    return sorted(cpus, key=lambda cpu: (firsts[core_of(cpu)], cpu))


def threads_per_core(cpus) -> int:
    """The most hardware threads one physical core has among ``cpus`` (1 without SMT)."""
    counts: dict[tuple[str, str], int] = {}
    for cpu in cpus:
        counts[core_of(cpu)] = counts.get(core_of(cpu), 0) + 1
    return max(counts.values(), default=1)


def usable_cores() -> int:
    """Physical cores among the CPUs this process may run on (its affinity mask).

    A container's or ``taskset``'s limit counts (fewer cores, not more); where SMT gives a core two
    hardware threads, the two count once (``topology/core_id`` per package), as TVM's own
    "ignore hyper-threading" intends but without assuming that every machine has SMT.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    return max(1, len({core_of(cpu) for cpu in cpus}))


def parse_threads(value, what: str) -> int:
    """A thread count from the command line or the environment; ValueError naming ``what`` otherwise."""
    try:
        count = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{what} must be a positive integer, got {value!r}") from None
    if not 1 <= count <= 4096:
        raise ValueError(f"{what} must be between 1 and 4096, got {count}")
    return count


def resolve_threads(requested: int | None, target: dict | None = None) -> tuple[int, str]:
    """``(threads, where the number came from)`` for an agent's TVM runtime.

    In order: ``--threads``; ``$TVM_NUM_THREADS`` if the user set it; the target's ``num-cores`` when
    the target was given with one; the cores this process may run on (:func:`usable_cores`).
    """
    if requested is not None:
        return parse_threads(requested, "--threads"), "--threads"
    env = os.environ.get(THREADS_ENV)
    if env:
        return parse_threads(env, f"${THREADS_ENV}"), f"${THREADS_ENV}"
    cores = (target or {}).get("num-cores") if (target or {}).get("kind") == "llvm" else None
    if cores:
        return parse_threads(cores, "the target's num-cores"), "the target's num-cores"
    return usable_cores(), "the cores this process may run on"


def runtime_threads() -> int | None:
    """The thread count this process's TVM runtime was told to use (``$TVM_NUM_THREADS``), if any."""
    try:
        return parse_threads(os.environ[THREADS_ENV], THREADS_ENV)
    except (KeyError, ValueError):
        return None
