"""`tunefarm runtime ...`: the device runtimes the PyPI TVM wheel lacks (OpenCL, oneDNN, cuBLAS/cuDNN)."""
from __future__ import annotations

import click

from tunefarm.cli_common import one_line_errors as _one_line_errors


@click.group()
def runtime():
    """Device runtimes the PyPI TVM wheel lacks, built for it on this machine."""


@runtime.command("opencl")
@click.option("--tvm-source", default=None, metavar="PATH",
              help="A TVM source tree (a checkout of the installed TVM's release tag; default: "
                   "$TUNEFARM_TVM_SOURCE). Needed unless the backend is already cached.")
@click.option("--rebuild", is_flag=True, help="Build again even if a cached backend exists.")
@_one_line_errors
def runtime_opencl(tvm_source, rebuild):
    """Build TVM's OpenCL backend for the installed wheel, cache it, and check it on this machine's device.

    \b
    The PyPI wheel is built with USE_OPENCL=OFF but loads libtvm_runtime_opencl.so from LD_LIBRARY_PATH.
    This compiles that library from TVM's source (two files, against the wheel's own runtime headers and
    the system's OpenCL headers; ~15 s), caches it under ~/.cache/tunefarm/opencl/ per TVM version, and
    checks that it loads, sees an OpenCL device and runs a kernel. Needs: a C++ compiler, opencl-headers,
    the ICD loader (ocl-icd-libopencl1) and a driver (intel-opencl-icd on an Intel iGPU, pocl-opencl-icd
    on any CPU). `tunefarm agent --opencl` does this itself.
    \b
    Get the source on a machine with internet (then copy it):
      git clone --depth 1 --branch v<installed TVM release> https://github.com/apache/tvm tvm-src
    """
    import json

    from tunefarm.device_agents.opencl_runtime import ensure_runtime, opencl_target
    from tunefarm.device_agents.probe import llvm_target, physical_cores

    rt = ensure_runtime(tvm_source, rebuild=rebuild, log=click.echo)
    dev = rt.device
    click.echo(f"OpenCL device: {dev.get('name')} (OpenCL {dev.get('compute_version')}, "
               f"{dev.get('multi_processor_count')} compute units, {dev.get('max_threads_per_block')} work-items "
               f"per work-group, {dev.get('max_shared_memory_per_block')} bytes local memory, warp size "
               f"{dev.get('warp_size')}); a test kernel ran with exact results")
    click.echo(f"library: {rt.lib_path}")
    click.echo("target: " + json.dumps(opencl_target(dev, llvm_target(physical_cores())), sort_keys=True))
    click.echo(f"use it: LD_LIBRARY_PATH={rt.lib_dir} python ...  (or: tunefarm agent --opencl ...)")


@runtime.command("onednn")
@click.option("--rebuild", is_flag=True, help="Build again even if a cached plugin exists.")
@_one_line_errors
def runtime_onednn(rebuild):
    """Build TVM's DNNL (oneDNN) runtime plugin for the installed wheel, cache it, and check it.

    \b
    The PyPI wheel is built with USE_DNNL=OFF but ships the DNNL JSON runtime's sources. This compiles them
    (with three TVM support headers this package carries) against the system's oneDNN 2.x into
    libtvm_dnnl_plugin.so (~15-30 s), caches it under ~/.cache/tunefarm/onednn/ per TVM version, and checks
    that it loads and runs a convolution matching numpy. Needs: a C++ compiler and libdnnl-dev
    (apt install libdnnl-dev). Agents load a cached plugin when they start and report it; the host needs
    it to compile models with oneDNN parts. TUNEFARM_ONEDNN_PLUGIN=off turns it off in a process.
    """
    from tunefarm.device_agents.onednn_runtime import ensure_plugin

    plugin = ensure_plugin(rebuild=rebuild, log=click.echo)
    info = plugin.info
    click.echo(f"oneDNN {info.get('version', '?')} ({info.get('cpu_runtime', '?')} threads, ISA {info.get('isa', '?')}); "
               f"a test convolution matched numpy to {info.get('conv_max_rel_err', float('nan')):.1e} relative")
    click.echo(f"plugin: {plugin.path}")


@runtime.command("cuda-libs")
@click.option("--rebuild", is_flag=True, help="Build again even if cached plugins exist.")
@_one_line_errors
def runtime_cuda_libs(rebuild):
    """Build TVM's cuBLAS and cuDNN runtime plugins for the installed wheel, cache them, and check them.

    \b
    The PyPI wheel is built with USE_CUBLAS/USE_CUDNN=OFF but ships the JSON runtimes' sources. This compiles
    them (host C++, no nvcc) against the NVIDIA libraries of this environment: the nvidia-* pip packages a CUDA
    build of PyTorch brings (nvidia-cublas, nvidia-cudnn-cu13, nvidia-cuda-runtime), or a CUDA toolkit under
    $CUDA_HOME or /usr/local/cuda, into libtvm_cublas_plugin.so and libtvm_cudnn_plugin.so (about a minute),
    caches them under ~/.cache/tunefarm/cuda-libs/ per TVM version, and checks that they load and, on a CUDA
    device, that a matmul (cuBLAS) and a convolution (cuDNN) match numpy. Agents load cached plugins when they
    start and report them; the host needs them to compile models with cuBLAS/cuDNN parts.
    TUNEFARM_CUDA_LIBS=off turns them off in a process.
    """
    from tunefarm.device_agents.cuda_libs_runtime import ensure_plugins

    plugins = ensure_plugins(rebuild=rebuild, log=click.echo)
    info = plugins.info
    versions = info.get("versions") or {}
    click.echo(f"cuBLAS {versions.get('cublas', '?')}, cuDNN {versions.get('cudnn', '?')}: both plugins load and "
               "register their runtimes")
    errs = info.get("max_rel_err")
    if errs:
        click.echo("on the CUDA device, against numpy (max relative error): "
                   + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    else:
        click.echo("no CUDA device here: the numerics check did not run (the host can still compile for them)")
    click.echo(f"plugins: {plugins.directory}")
