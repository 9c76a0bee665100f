"""The device-agent role: what runs on each device of the farm.

``probe`` describes the machine (CPU, C compiler, CUDA, OpenCL) as a ``DeviceInfo`` and resolves the
target the agent serves; ``rpc_server`` is the stock ``tvm.rpc`` server process that publishes that
``DeviceInfo`` with its tracker registration; ``agent`` supervises that process and keeps it
registered across tracker restarts and dead listen loops.
"""
