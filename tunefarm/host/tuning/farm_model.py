"""The farm learns: one XGBoost cost model per target, trained on every trusted job's measurements.

Every job used to start MetaSchedule's XGBoost cost model from nothing. The farm keeps, under the logs
directory (``.cost_models/<key>/``), a model per target — the key names the target (its JSON, ``num-cores``
included: schedules are timed with that many threads) and the TVM version — rebuilt after each job for that
target finishes, from the measured records of every **trusted** job directory tuned for it:

* its last run ended (finished or stopped; not failed, not killed mid-run);
* its timings were checked (``verified.jsonl`` exists: tuning/verify.py), and no agent of it was ever caught
  (no record below the physical floor, no strike): a job that met a suspect agent is no training data;
* only valid records (failed candidates carry no time) enter.

Features are MetaSchedule's own (``PerStoreFeature``, the extractor ``tune_tasks`` gives ``"xgb"``), extracted
once per job directory and kept beside the model (``features/<job>.npz``, redone when the job's database
changes); training is MetaSchedule's ``XGBModel`` objective on all groups. Nothing is pickled: features and
costs are plain NumPy arrays (``allow_pickle=False``), the booster is XGBoost's JSON model, the rest JSON.
(MetaSchedule's own ``XGBModel.save`` / ``load`` use a pickled NumPy object array: never loaded here.)

A job starts from the farm model (``tuning.cost_model: xgb-farm``, the default when one exists for its
target): the model predicts from the first round, and every measurement of the job is added to its data as
MetaSchedule's model would add it, with a retrain at least every :data:`RETRAIN_EVERY` new measurements (stock
adaptive training waits for 20% more data, which with thousands of farm records would mean never).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tunefarm.core.threads import usable_cpus
from tunefarm.host.tuning.jobdir import VERIFIED, JobDir, job_dirs, mean_run_s

MODELS_DIR = ".cost_models"
META = "model.json"
BOOSTER = "booster.json"
RETRAIN_EVERY = 64
MAX_ROWS = 5_000_000  # feature rows one model may hold (each ~164 float32): ~3 GiB at most


def model_key(target: dict[str, Any], tvm_version: str | None = None) -> str:
    """The directory name of a target's model: readable head, hash of the exact target and TVM version."""
    if tvm_version is None:
        import tvm  # pylint: disable=import-outside-toplevel

        tvm_version = str(tvm.__version__)
    canonical = json.dumps(target, sort_keys=True) + "|" + tvm_version
    head = [str(target.get("kind") or target.get("tag") or "target")]
    for name in ("mcpu", "arch", "device"):
        if target.get(name):
            head.append(str(target[name]))
    if target.get("num-cores"):
        head.append(f"{target['num-cores']}c")
    slug = "-".join(head).replace("/", "_")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in slug)[:60]
    return f"{safe}-tvm{tvm_version}-{hashlib.sha256(canonical.encode()).hexdigest()[:10]}"


def models_root(logs_dir: str | Path) -> Path:
    return Path(logs_dir) / MODELS_DIR


def model_dir(logs_dir: str | Path, target: dict[str, Any]) -> Path:
    return models_root(logs_dir) / model_key(target)


# ---------------------------------------------------------------- which jobs may teach

def trust_problem(job_dir: JobDir, target: dict[str, Any]) -> str | None:
    """Why ``job_dir`` gives no training data for ``target`` (None: it does)."""
    try:
        state = job_dir.read_state()
    except Exception:  # pylint: disable=broad-except
        return "unreadable job state"
    if state.get("target") != target:
        return "another target"
    if not job_dir.run_ended():
        return "its last run did not end (failed or killed)"
    log = job_dir.file(VERIFIED)
    if not log.is_file():
        return "its timings were not checked (tuned before verification)"
    try:
        for line in log.read_text(errors="replace").splitlines():
            entry = json.loads(line) if line.strip() else {}
            if isinstance(entry, dict) and (entry.get("status") == "below_floor" or entry.get("strike")):
                return "an agent of it reported an impossible or unreproducible time"
    except (OSError, ValueError):
        return "unreadable verified.jsonl"
    if not job_dir.has_database():
        return "no database"
    return None


def _db_signature(job_dir: JobDir) -> str:
    parts = []
    for name in ("database_tuning_record.json", "database_workload.json"):
        path = job_dir.file(name)
        st = path.stat() if path.is_file() else None
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}" if st else f"{name}:-")
    return "|".join(parts)


# ---------------------------------------------------------------- features

def _extractor():
    from tvm.s_tir.meta_schedule.feature_extractor import PerStoreFeature  # pylint: disable=import-outside-toplevel

    return PerStoreFeature()  # what tune_tasks' "xgb" uses (XGBModel's default extractor)


def extract_job(job_dir: JobDir, target: dict[str, Any]) -> dict[str, np.ndarray]:
    """Features of every valid record of ``job_dir``: ``rows`` (all feature rows), ``offsets`` (each
    record's rows are ``rows[offsets[i]:offsets[i+1]]``), ``costs`` (median run seconds, as
    MetaSchedule's model takes them), ``groups`` (index into ``group_hashes``, MetaSchedule's group key:
    the workload's structural hash)."""
    # pylint: disable=import-outside-toplevel
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.utils import shash2hex

    extractor = _extractor()
    tvm_target = tvm.target.Target(target)
    from tunefarm.host.tuning.intrinsics import load_for  # pylint: disable=import-outside-toplevel

    load_for(tvm_target)  # TuneContext imports every architecture's intrinsics otherwise
    by_workload: dict[str, list] = OrderedDict()
    for rec in job_dir.open_database().get_all_tuning_records():
        if mean_run_s(rec.run_secs) is None:
            continue
        by_workload.setdefault(shash2hex(rec.workload.mod), []).append(rec)
    rows, offsets, costs, groups, hashes = [], [0], [], [], []
    for gi, (group_hash, recs) in enumerate(by_workload.items()):
        hashes.append(group_hash)
        context = ms.TuneContext(mod=recs[0].workload.mod, target=tvm_target, num_threads=1)
        candidates, kept = [], []
        for rec in recs:
            try:
                candidates.append(rec.as_measure_candidate())
                kept.append(rec)
            except Exception:  # pylint: disable=broad-except  # a trace that no longer replays
                continue
        if not candidates:
            continue
        for rec, feats in zip(kept, extractor.extract_from(context, candidates)):
            arr = feats.numpy().astype("float32")
            if arr.size == 0:
                continue
            rows.append(arr)
            offsets.append(offsets[-1] + arr.shape[0])
            costs.append(float(np.median([float(s) for s in rec.run_secs])))
            groups.append(gi)
    width = rows[0].shape[1] if rows else 0
    return {"rows": np.concatenate(rows) if rows else np.zeros((0, width), "float32"),
            "offsets": np.asarray(offsets, dtype="int64"), "costs": np.asarray(costs, dtype="float32"),
            "groups": np.asarray(groups, dtype="int32"), "group_hashes": np.asarray(hashes, dtype="U64")}


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        out = {k: data[k] for k in ("rows", "offsets", "costs", "groups", "group_hashes")}
    n = len(out["costs"])
    if (out["offsets"].shape != (n + 1,) or out["groups"].shape != (n,) or out["rows"].ndim != 2
            or int(out["offsets"][-1]) != out["rows"].shape[0] or np.any(np.diff(out["offsets"]) <= 0)
            or (n and (out["groups"].min() < 0 or out["groups"].max() >= len(out["group_hashes"])))
            or not np.all(np.isfinite(out["costs"])) or np.any(out["costs"] <= 0)):
        raise ValueError(f"{path} is not a feature set this farm wrote")
    return out


# ---------------------------------------------------------------- the model

_MODEL_CLASS: list = []


def _farm_model_class():
    if _MODEL_CLASS:
        return _MODEL_CLASS[0]
    from tvm.ir.utils import derived_object  # pylint: disable=import-outside-toplevel
    from tvm.s_tir.meta_schedule.cost_model import XGBModel  # pylint: disable=import-outside-toplevel

    @derived_object
    class FarmXGBModel(XGBModel._cls):  # pylint: disable=protected-access  # derived_object's own rule
        """MetaSchedule's XGBModel, starting from the farm's data and booster, retraining at least every
        :data:`RETRAIN_EVERY` new measurements."""

        def update(self, context, candidates, results) -> None:
            if self.data_size + len(candidates) - self.last_train_size >= RETRAIN_EVERY:
                self.last_train_size = 0  # passes stock adaptive training's 20%-more-data test this time
            super().update(context, candidates, results)

    _MODEL_CLASS.append(FarmXGBModel)
    return FarmXGBModel


def new_model(num_tuning_cores: int | None = None):
    """A cold model configured as ``tune_tasks`` configures ``"xgb"``."""
    return _farm_model_class()(num_tuning_cores=num_tuning_cores or usable_cpus())


def _groups_from(sets: list[dict[str, np.ndarray]]):
    from tvm.s_tir.meta_schedule.cost_model.xgb_model import FeatureGroup  # pylint: disable=import-outside-toplevel

    features: dict[str, list] = OrderedDict()
    costs: dict[str, list] = OrderedDict()
    for data in sets:
        for i, cost in enumerate(data["costs"]):
            key = str(data["group_hashes"][data["groups"][i]])
            features.setdefault(key, []).append(data["rows"][data["offsets"][i]:data["offsets"][i + 1]])
            costs.setdefault(key, []).append(float(cost))
    return OrderedDict((k, FeatureGroup(group_hash=k, features=features[k], costs=np.asarray(costs[k], "float32")))
                       for k in features)


def _train(model, groups) -> None:
    model.data = groups
    model.data_size = sum(len(g.costs) for g in groups.values())
    if not model.data_size:
        return
    xs = [f for g in groups.values() for f in g.features]
    with np.errstate(divide="ignore", invalid="ignore"):
        ys = np.concatenate([np.divide(g.min_cost, g.costs, out=np.zeros_like(g.costs), where=g.costs != 0)
                             for g in groups.values()])
    model._train(xs=xs, ys=ys)  # pylint: disable=protected-access  # MetaSchedule's own objective
    model.last_train_size = model.data_size


def rebuild(logs_dir: str | Path, target: dict[str, Any], log: Callable[[str], None] | None = None
            ) -> dict[str, Any] | None:
    """Rebuild the farm model of ``target`` from every trusted job directory under ``logs_dir``; returns its
    ``model.json`` (None when no job gives data). Features of unchanged jobs come from their cache. One
    rebuild per model at a time (a lock file: the host service's workers may finish jobs together)."""
    import fcntl  # pylint: disable=import-outside-toplevel

    out = model_dir(logs_dir, target)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _rebuild(logs_dir, target, log or (lambda _msg: None))


def _rebuild(logs_dir, target, log) -> dict[str, Any] | None:
    import tvm  # pylint: disable=import-outside-toplevel

    out = model_dir(logs_dir, target)
    feat_dir = out / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    sets, jobs, skipped = [], {}, {}
    for job_dir in job_dirs(logs_dir):
        why = trust_problem(job_dir, target)
        if why is not None:
            if why != "another target":
                skipped[job_dir.name] = why
            continue
        sig = _db_signature(job_dir)
        cache = feat_dir / f"{job_dir.name}.npz"
        sig_file = feat_dir / f"{job_dir.name}.sig"
        data = None
        if cache.is_file() and sig_file.is_file() and sig_file.read_text() == sig:
            try:
                data = _load_npz(cache)
            except (OSError, ValueError, KeyError):
                data = None
        if data is None:
            try:
                data = extract_job(job_dir, target)
            except Exception as err:  # pylint: disable=broad-except  # an unreadable database is no source
                skipped[job_dir.name] = f"its records could not be read ({str(err).splitlines()[0][:120]})"
                continue
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, **data)
            os.replace(tmp, cache)
            sig_file.write_text(sig)
        if len(data["costs"]):
            sets.append((job_dir.name, data))
            jobs[job_dir.name] = int(len(data["costs"]))
    extract_s = time.monotonic() - t0
    if not sets:
        return None
    # A bound on memory and training time: the oldest jobs (by name order, job_dirs' order) go first.
    while len(sets) > 1 and sum(d["rows"].shape[0] for _, d in sets) > MAX_ROWS:
        name, _ = sets.pop(0)
        skipped[name] = f"left out: the model holds at most {MAX_ROWS} feature rows"
        del jobs[name]
    t1 = time.monotonic()
    model = new_model()
    _train(model, _groups_from([d for _, d in sets]))
    train_s = time.monotonic() - t1
    tmp = out / "booster.tmp.json"  # XGBoost picks the format by the suffix: JSON
    model.booster.save_model(str(tmp))
    os.replace(tmp, out / BOOSTER)
    meta = {"key": out.name, "target": target, "tvm": str(tvm.__version__), "records": model.data_size,
            "workloads": len(model.data), "jobs": jobs, "skipped": skipped,
            "extract_s": round(extract_s, 2), "train_s": round(train_s, 2),
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = out / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / META)
    log(f"farm cost model {out.name}: {model.data_size} records of {len(jobs)} job(s), "
        f"{len(model.data)} workloads; features {extract_s:.1f} s, training {train_s:.1f} s")
    return meta


def read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and (path / BOOSTER).is_file() else None


def available(logs_dir: str | Path, target: dict[str, Any]) -> dict[str, Any] | None:
    """The farm model's ``model.json`` for ``target``, if one exists."""
    return read_meta(model_dir(logs_dir, target))


def load(logs_dir: str | Path, target: dict[str, Any], num_tuning_cores: int | None = None):
    """``(model, meta, load_s)``: the farm model of ``target``, ready for ``tune_tasks``; ValueError if it is
    missing or damaged."""
    import xgboost as xgb  # pylint: disable=import-outside-toplevel

    t0 = time.monotonic()
    path = model_dir(logs_dir, target)
    meta = read_meta(path)
    if meta is None:
        raise ValueError(f"no farm cost model in {path}")
    sets = []
    for name in meta.get("jobs", {}):
        sets.append(_load_npz(path / "features" / f"{Path(str(name)).name}.npz"))
    model = new_model(num_tuning_cores)
    model.data = _groups_from(sets)
    model.data_size = sum(len(g.costs) for g in model.data.values())
    if model.data_size != meta.get("records"):
        raise ValueError(f"{path}: its features hold {model.data_size} records, model.json says {meta.get('records')}")
    booster = xgb.Booster()
    booster.load_model(str(path / BOOSTER))  # XGBoost's JSON format: data, not code
    model.booster = booster
    model.last_train_size = model.data_size
    return model, meta, time.monotonic() - t0


def list_models(logs_dir: str | Path) -> list[dict[str, Any]]:
    """Every farm model under ``logs_dir`` (its ``model.json``), by key."""
    root = models_root(logs_dir)
    out = []
    for path in sorted(root.glob("*/")) if root.is_dir() else []:
        meta = read_meta(path)
        if meta is not None:
            out.append(meta)
    return out
