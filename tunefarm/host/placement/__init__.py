"""Placement by measurement: each operator group that a vendor library can run goes to the library or stays with
TVM's tuned kernel, whichever measured faster on an agent of the job's key.

One mechanism for every vendor library (oneDNN on CPUs now; cuDNN and cuBLAS on GPUs are entries of
:data:`tunefarm.host.placement.vendors.VENDORS` when their codegens exist). After tuning, a job's evaluation
(host/tuning/evaluate.py) asks :func:`tunefarm.host.placement.measure.measure_groups` to

1. take the graph the job tuned (its pipeline's graph-level steps, before legalisation) and find every group a
   vendor's patterns match (conv2d with bias, residual add and ReLU; dense; matmul), one module per distinct group
   (same composite, shapes and attributes: measured once, counted as often as the model has it);
2. build each group twice: offloaded to the library (its codegen, constants prepacked by the library at load) and
   as TVM compiles it with the job's records applied (the same fused TIR function the job tuned, where the
   group's boundaries are TVM's fusion's: otherwise it says "no record" and the group stays with TVM);
3. run both on one agent of the key through the agents' own TVM runner (same session kind, same threads: the
   agent's, for TVM's pool and oneDNN's OpenMP pool), warmed up and timed many times, and check both against a
   reference computed on the host (the group built by TVM without records);
4. place each group on the faster verified build.

The evaluation then builds the whole model three ways, all-TVM (``tvm-tuned``), every group offloaded
(``tvm-vendor``) and as placed (``tvm-placed``), runs them as rows of the same comparison on the same agent (the
whole-model time includes whatever layout conversions the offloaded parts do around themselves), and the fastest
build with correct numerics is the job's model: ``placement.json`` in the job directory
(:mod:`tunefarm.host.placement.result`) names it and its offloaded groups, ``pull`` exports it beside the records
and :func:`tunefarm.host.placement.apply.compile_pulled` builds it from a pulled directory in one call.
"""
