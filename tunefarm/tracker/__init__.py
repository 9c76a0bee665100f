"""The tracker role: stock TVM RPC tracker, run and watched (``service``), and queried (``client``).

The tracker itself is ``tvm.rpc.tracker.Tracker`` unchanged, so stock TVM tools and runners work
against a tunefarm tracker. tunefarm adds only what the stock one lacks: a log of agents joining and
leaving, bounded connects, and a per-key view that includes each agent's ``DeviceInfo``.
"""
