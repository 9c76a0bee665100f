"""TVM's popen worker (``tvm.exec.popen_worker``), started without PyTorch: the farm's build workers.

``import tvm`` imports ``tvm_ffi``, whose package init tries ``import torch`` first wherever PyTorch is
installed (a workaround for a symbol clash on Windows, tvm-ffi 0.1.14); a build worker never uses it, and
PyTorch was two thirds of a fresh worker's start: a 2-worker pool took 6.2-8.0 s to start on the 2-core
development machine, 2.2-3.2 s without it. A search worker starts a pool for every share (5-10 batches on the
lent 16-core host), and every pool restarts a worker after a build timeout. ``torch`` set to None in
``sys.modules`` makes that import raise ImportError, which tvm_ffi catches; the rest is TVM's own worker.

    python -m tunefarm.core.popen_worker READ_FD WRITE_FD
"""
import sys

if __name__ == "__main__":
    sys.modules.setdefault("torch", None)  # type: ignore[assignment]
    from tvm.exec.popen_worker import main  # pylint: disable=wrong-import-position

    main()
