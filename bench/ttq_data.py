"""The time-to-quality job data the results need, kept compressed: bench/ttq/<run>.tar.xz.

    python -m bench.ttq_data unpack            # bench/ttq/<run>/ from each archive (git-ignored; kept if there)
    python -m bench.ttq_data pack bench/ttq/resnet18-vm-2c [...]   # (re)write <run>.tar.xz from a run directory

A run directory is what ``python -m bench.time_to_quality --dir DIR`` writes: its checkpoints and run.json, and
the job directory ``ttq/`` with MetaSchedule's database. An archive keeps only what the results are made from —
the database, the job's spec, state, tasks, progress, profile and verified timings, and the checkpoints — never
logs, the agents' and tracker's output, cost-model caches or locks (a farm cost model is rebuilt from the
databases). ``bench/results/compare-ttq-resnet-cpu/``, ``model_latency-vm-2c``, ``time_to_quality-*`` (its
``--report-only``) and ``bench.transfer --sources`` read the unpacked directories. Archives are written with
fixed owners and times, so packing the same files again gives the same bytes.
"""
from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

TTQ = Path(__file__).resolve().parent / "ttq"
RUN_FILES = ("checkpoints.jsonl", "run.json")
JOB_FILES = ("database_tuning_record.json", "database_workload.json", "job.yaml", "job_state.json", "tasks.json",
             "progress.jsonl", "profile.json", "verified.jsonl")
JOB_DIR = "ttq"
LIMIT_BYTES = 10 << 20  # every archive together


def kept_files(run_dir: Path) -> list[str]:
    """The run's files an archive keeps, relative to the run directory, in a fixed order."""
    names = [name for name in RUN_FILES if (run_dir / name).is_file()]
    names += [f"{JOB_DIR}/{name}" for name in JOB_FILES if (run_dir / JOB_DIR / name).is_file()]
    if f"{JOB_DIR}/database_tuning_record.json" not in names:
        raise SystemExit(f"{run_dir}: no {JOB_DIR}/database_tuning_record.json (not a time-to-quality run?)")
    return names


def pack(run_dir: Path) -> Path:
    run_dir = run_dir.resolve()
    archive = run_dir.parent / f"{run_dir.name}.tar.xz"
    with tarfile.open(archive, "w:xz", preset=9) as tar:
        for rel in kept_files(run_dir):
            data = (run_dir / rel).read_bytes()
            info = tarfile.TarInfo(f"{run_dir.name}/{rel}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return archive


def unpack(archive: Path, force: bool = False) -> Path | None:
    """Extract ``archive`` beside it; None (and nothing written) when its directory is already there."""
    target = archive.parent / archive.name.removesuffix(".tar.xz")
    if target.exists() and not force:
        return None
    with tarfile.open(archive, "r:xz") as tar:
        members = tar.getmembers()
        bad = [m.name for m in members if not m.isfile() or not m.name.startswith(f"{target.name}/")]
        if bad:
            raise SystemExit(f"{archive}: unexpected members {bad[:3]}")
        tar.extractall(archive.parent, members=members, filter="data")
    return target


def archives() -> list[Path]:
    return sorted(TTQ.glob("*.tar.xz"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("unpack", help="extract every bench/ttq/*.tar.xz whose directory is not there")
    up.add_argument("--force", action="store_true", help="extract over an existing directory")
    pk = sub.add_parser("pack", help="write RUN_DIR.tar.xz beside each RUN_DIR")
    pk.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "unpack":
        for archive in archives():
            done = unpack(archive, force=args.force)
            print(f"{archive.name}: " + (f"unpacked into {done}" if done else "directory already there, kept"))
        return 0
    for run_dir in args.run_dirs:
        archive = pack(run_dir)
        print(f"{run_dir}: {archive} ({archive.stat().st_size / 2**20:.2f} MiB)")
    total = sum(a.stat().st_size for a in archives())
    if total > LIMIT_BYTES:
        print(f"warning: bench/ttq/*.tar.xz hold {total / 2**20:.1f} MiB together, over the "
              f"{LIMIT_BYTES >> 20} MiB this repository keeps", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
