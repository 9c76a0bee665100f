"""Each batch of a tuning loop, from MetaSchedule's own task-scheduler log: when its search began, how long the
search and the build took, and what the loop did after its last batch (joining the measurements, the timing
verifier's second measurements, the cost model's updates).

    python -m bench.batch_timeline LOG [LOG ...]

LOG is a ``tvm.s_tir.meta_schedule.logging.task_scheduler.log`` (a job's ``logs/``, or a search worker's share
directory ``tunefarm-search-*/logs/``: ``bench/device/search_scaling_h200.sh follow`` brings both back in
work.tgz). The log's times are whole seconds, so a batch's parts are read to +-1 s. Per log: one line per batch
(task, search s, build s) and the totals: first pick to last batch sent to the runner, and from there to the
log's last line (the loop's end: the last joins and their callbacks).
"""
from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \[\w+\] \[task_scheduler\.cc:\d+\] (.*)$")
_PICK = re.compile(r'TaskScheduler picks Task #(\d+): "([^"]*)"')
_BUILD = re.compile(r"Sending (\d+) sample\(s\) to builder")
_RUN = re.compile(r"Sending (\d+) valid sample\(s\) to runner")


def batches(text: str) -> tuple[list[dict], float | None, float | None]:
    """The batches of one task-scheduler log (task, name, picked, to_builder, to_runner as epoch seconds, samples)
    and the log's first and last timestamps."""
    out: list[dict] = []
    first = last = None
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        when = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
        first = when if first is None else first
        last = when
        msg = m.group(2)
        if (p := _PICK.search(msg)) is not None:
            out.append({"task": int(p.group(1)), "name": p.group(2), "picked": when, "to_builder": None,
                        "to_runner": None, "samples": 0})
        elif (b := _BUILD.search(msg)) is not None and out:
            out[-1]["to_builder"], out[-1]["samples"] = when, int(b.group(1))
        elif _RUN.search(msg) is not None and out:
            out[-1]["to_runner"] = when
    return out, first, last


def describe(path: Path) -> list[str]:
    found, first, last = batches(path.read_text(errors="replace"))
    lines = [f"{path}: {len(found)} batch(es)"]
    if not found:
        return lines
    for b in found:
        search = b["to_builder"] - b["picked"] if b["to_builder"] is not None else None
        build = b["to_runner"] - b["to_builder"] if None not in (b["to_runner"], b["to_builder"]) else None
        lines.append(f"  {datetime.datetime.fromtimestamp(b['picked']):%H:%M:%S} task {b['task']:>2} "
                     f"{b['name'][:40]:<40} {b['samples']:>3} samples  search {_s(search)}  build {_s(build)}")
    sent = [b["to_runner"] for b in found if b["to_runner"] is not None]
    searched = sum(b["to_builder"] - b["picked"] for b in found if b["to_builder"] is not None)
    built = sum(b["to_runner"] - b["to_builder"] for b in found if None not in (b["to_runner"], b["to_builder"]))
    lines.append(f"  from the log's start to the first pick {_s(found[0]['picked'] - first)}; batches "
                 f"{_s(max(sent) - found[0]['picked']) if sent else '-'} (search {searched:.0f} s, build {built:.0f} s);"
                 f" after the last batch went to the runner {_s(last - max(sent)) if sent else '-'}")
    return lines


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_timeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.logs if not p.is_file()]
    if missing:
        print(f"batch_timeline: no such file: {missing[0]}", file=sys.stderr)
        return 2
    for path in args.logs:
        print("\n".join(describe(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
