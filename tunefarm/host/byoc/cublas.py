"""cuBLAS as a farm backend on the host: the ``relax.ext.cublas`` codegen and its partition, for placement
(host/placement/vendors.py). Both CUDA libraries are made by one module: :mod:`tunefarm.host.byoc.cuda_libs`."""
from tunefarm.host.byoc.cuda_libs import describe, lower, make_vendor  # noqa: F401  (describe/lower: for tests)

_vendor = make_vendor("cublas")
CODEGEN = _vendor.CODEGEN
register = _vendor.register
patterns = _vendor.patterns
candidate_groups = _vendor.candidate_groups
partition = _vendor.partition
offload = _vendor.offload
offloaded_functions = _vendor.offloaded_functions
