"""The agents' model runners on a real GPU, without TVM: PyTorch eager (torch.export program and the
torchvision nn.Module), torch.compile, ONNX Runtime and TensorRT on ResNet-18, batch 1, random weights.

    PYTHONPATH=. OUT=bench/results/runners-h100 python3 bench/runners_gpu_check.py

Each runner is called as an agent calls it (tunefarm.device_agents.runners.run); outputs are compared with
PyTorch on the CPU in fp32. Writes $OUT/gpu_runners.json.
"""
import json, os, sys, time
import numpy as np, torch, torchvision
sys.path.insert(0, os.getcwd())
from tunefarm.device_agents.runners import available, run
out = os.environ.get("OUT", "/tmp")
print("torch", torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))
print("available cpu:", json.dumps(available()))
print("available cuda:", json.dumps(available({"device": "cuda"})))
torch.manual_seed(0)
m = torchvision.models.resnet18(weights=None).eval()
x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
with torch.no_grad():
    ref = m(torch.from_numpy(x)).numpy()
torch.export.save(torch.export.export(m, (torch.from_numpy(x),)), "/tmp/r18.pt2")
torch.save({"torchvision": "resnet18", "state_dict": m.state_dict()}, "/tmp/r18.pt")
torch.onnx.export(m, (torch.from_numpy(x),), "/tmp/r18.onnx", input_names=["input0"], dynamo=False)
np.savez("/tmp/in.npz", input0=x)
res = {}
for backend, path, opts in [("torch", "/tmp/r18.pt2", {"device": "cuda"}), ("torch", "/tmp/r18.pt", {"device": "cuda"}),
                            ("torch-compile", "/tmp/r18.pt", {"device": "cuda"}),
                            ("onnxruntime", "/tmp/r18.onnx", {}),
                            ("tensorrt", "/tmp/r18.onnx", {"precision": "fp16"})]:
    t0 = time.time()
    r = run(backend, path, "/tmp/in.npz", "/tmp/o.npz", 10, 100, opts)
    r["wall_s"] = round(time.time() - t0, 1)
    if "outputs_file" in r:
        got = np.load("/tmp/o.npz")["arr_0"]
        r["max_abs_err"] = float(np.abs(got - ref).max())
    res[f"{backend}{opts}{path}"] = r
    lat = r.get("latency", {})
    print(backend, opts, {k: r.get(k) for k in ("available", "reason", "error", "device", "gpu", "compile_s", "max_abs_err", "wall_s", "model_form")},
          "median", lat.get("median_ms"), "p90", lat.get("p90_ms"), "first", lat.get("first_run_ms"))
json.dump(res, open(os.path.join(out, "gpu_runners.json"), "w"), indent=2, default=str)
