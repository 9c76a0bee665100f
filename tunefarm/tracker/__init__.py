"""The tracker role: TVM's RPC tracker with the farm's checks, run and watched (``server``), and queried (``client``).

The tracker is ``tvm.rpc.tracker`` from TVM 0.27 (its protocol, queues and ``SUMMARY`` unchanged, so stock TVM
servers and clients that hold the farm key, or use an open key, work against it), started in its own process
with four methods of that module's classes patched there (server.py ``_start_stock_tracker`` says which and
why): every request is checked before the stock handler sees it, registering and requesting on a key need the
farm key, connections go without Nagle's delay, and ``SUMMARY`` lists the servers refused lately. tunefarm adds
around it a log of agents joining and leaving, bounded connects, and a per-key view with each agent's
``DeviceInfo``.
"""
