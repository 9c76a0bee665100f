"""Search workers: the job's search spread over machines (a role of its own, as ``tvm/rpc`` keeps its roles).

protocol.py names the RPC functions and bounds and checks a worker's answers (its docstring is the
specification); worker.py is the worker's side (``tunefarm search-worker`` serves it); driver.py the host's
(``run_spread``, called by tuning/job.py); dealing.py splits a job's tasks and trials into shares. The share
itself is :class:`tunefarm.core.share.SearchShare`. Both sides tune through the farm's one tuning loop,
tunefarm/host/tuning/loop.py.
"""
