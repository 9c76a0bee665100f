"""TVM's ``PopenWorker`` whose process starts without PyTorch (:mod:`tunefarm.core.popen_worker`).

Used by the host's build pools and by the tracker: neither runs PyTorch, and ``import torch`` (which tvm_ffi
tries first whenever it is installed) was most of a fresh worker's start (see that module).
"""
from __future__ import annotations

import os
import subprocess
import sys

from tvm.support.popen_pool import PopenWorker


class TorchlessWorker(PopenWorker):
    """TVM's PopenWorker started as ``tunefarm.core.popen_worker`` (TVM's worker without importing PyTorch:
    a third of the start-up time, see that module). Its ``_start`` is TVM 0.27's POSIX branch with that
    module name; elsewhere TVM's own."""

    def _start(self):
        if self._proc is not None or sys.platform == "win32":
            super()._start()
            return
        main_read, worker_write = os.pipe()
        worker_read, main_write = os.pipe()
        cmd = [sys.executable, "-m", "tunefarm.core.popen_worker", str(worker_read), str(worker_write)]
        self._proc = subprocess.Popen(cmd, pass_fds=(worker_read, worker_write), stdout=self._stdout,
                                      stderr=self._stderr)
        os.close(worker_read)
        os.close(worker_write)
        self._reader = os.fdopen(main_read, "rb")
        self._writer = os.fdopen(main_write, "wb")
