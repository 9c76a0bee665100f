"""tunefarm: a distributed tuning farm for deep-learning models built on Apache TVM.

Three roles, one package:
  tunefarm.tracker        the TVM RPC tracker that devices register with
  tunefarm.device_agents  the agents that run on each device (real tvm.rpc servers)
  tunefarm.host           the tuner: model import, MetaSchedule tuning, evaluation, reports
tunefarm.core holds what all roles share (wire formats, job specs, errors); roles never import
each other's internals.
"""

__version__ = "0.1.0"
