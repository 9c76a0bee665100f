"""tunefarm: a distributed tuning farm for deep-learning models on Apache TVM."""
from setuptools import find_packages, setup

# apache-tvm-ffi 0.1.15.x segfaults on every MetaSchedule JSON database write
# (tvm::ffi::ToJSONGraph); 0.1.14.post1 is the last release that works with TVM 0.27.
INSTALL_REQUIRES = [
    "apache-tvm==0.27.0.post1",
    "apache-tvm-ffi==0.1.14.post1",
    # torch/torchvision: the exact releases this project is checked with (other versions
    # download several GB or fail to import beside each other).
    "torch==2.14.1",
    "torchvision==0.29.1",
    "xgboost",
    "pyyaml",
    "rich",
    "click",
    "onnx",
    "onnxruntime",
    "onnxscript",  # torch.onnx.export's exporter in torch 2.x needs it
    "tornado",
    "psutil",
    "cloudpickle",
    "matplotlib",
    "requests",  # the laptop client (tunefarm submit/follow/pull) and agents' heartbeats to the host service
]

setup(
    name="tunefarm",
    version="0.1.0",
    description="Distributed tuning farm for deep-learning models built on Apache TVM (MetaSchedule + RPC)",
    packages=find_packages(include=["tunefarm", "tunefarm.*"]),
    package_data={"tunefarm.host.service": ["static/*.*", "static/vendor/*/*"],  # the dashboard
                  # TVM support headers the vendor plugin builds need (tunefarm runtime onednn | cuda-libs)
                  "tunefarm.device_agents": ["contrib_support/*", "contrib_support/*/*", "contrib_support/*/*/*",
                                             "contrib_support/*/*/*/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest", "pytest-timeout", "selenium"],  # selenium drives Debian's chromium (dashboard test)
        # GPU box: imported lazily, only by the TensorRT runner.
        "gpu": ["tensorrt", "cuda-python"],
    },
    entry_points={"console_scripts": ["tunefarm=tunefarm.cli:main"]},
)
