"""JobProgress (tunefarm.host.tuning.progress): a run's trials and "best est." against the whole job.

Pure Python (rich writes to a string), no processes, no TVM."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from tunefarm.host.console import ConsoleEvents
from tunefarm.host.tuning.jobdir import JobDir
from tunefarm.host.tuning.progress import JobProgress


def test_a_resumed_run_estimates_the_whole_model_and_counts_measured_trials_only(tmp_path):
    console = Console(file=io.StringIO(), width=200)
    # Three tasks; an earlier run found tasks 0 and 2, this run tunes task 1 only (MetaSchedule's task 0).
    progress = JobProgress(tmp_path, ["t0", "t1", "t2"], [1.0, 2.0, 3.0], total_trials=40, events=ConsoleEvents(console),
                           start_best={0: 1e-3, 2: 2e-3}, trials_before=24, run_tasks=[1])
    assert progress.estimated_ms() is None  # task 1 has nothing yet
    progress.on_batch(0, [4e-3, None, 5e-3], errors=1, cache_hits=2)
    # Every task counts, those tuned in earlier runs too: 1 x 1 + 2 x 4 + 3 x 2 ms.
    assert progress.estimated_ms() == pytest.approx(15.0)
    assert progress.trials == 27 and progress.cache_hits == 2  # 3 measured (one failed), 2 answered from the database
    assert (progress.run_ok, progress.run_failed) == (2, 1)
    (event,) = JobDir(tmp_path).events()
    assert (event["task_id"], event["task"], event["batch"], event["errors"], event["cache_hits"]) == (1, "t1", 3, 1, 2)
    assert event["trials"] == 27 and event["task_best_us"] == pytest.approx(4000.0)
    assert event["estimated_ms"] == pytest.approx(15.0)
    progress.on_batch(0, [], errors=0, cache_hits=4)  # a batch of cache hits only: no trial
    assert progress.trials == 27 and progress.cache_hits == 6
    assert JobDir(tmp_path).events()[-1]["batch"] == 0
    progress.on_batch(0, [], errors=0, cache_hits=0)  # the search found nothing new: no line
    assert len(JobDir(tmp_path).events()) == 2


def test_the_engine_shows_nothing_itself_and_the_console_renders_its_lines_escaped(tmp_path, capsys):
    """The engine's events (host/tuning/events.py): plain Events shows nothing (a search worker, the service);
    ConsoleEvents renders a flagged agent's line with the agent's own text shown as it is, never as markup."""
    from tunefarm.host.tuning.events import Events
    from tunefarm.host.tuning.verify import STRIKES_TO_FLAG, TimingVerifier

    silent = TimingVerifier(runner=None, log_path=tmp_path / "verified.jsonl", events=Events())
    quiet = JobProgress(tmp_path, ["t0"], [1.0], total_trials=4, events=Events())
    with quiet.progress:
        quiet.on_batch(0, [1e-3], errors=0)
    for _ in range(STRIKES_TO_FLAG):
        silent._strike("[bold]agent-x", "[/]too fast")  # pylint: disable=protected-access
    assert silent.flagged == {"[bold]agent-x": "[/]too fast"} and quiet.trials == 1
    assert capsys.readouterr() == ("", "")

    out = io.StringIO()
    shown = TimingVerifier(runner=None, log_path=tmp_path / "verified.jsonl",
                           events=ConsoleEvents(Console(file=out, width=200)))
    for _ in range(STRIKES_TO_FLAG + 1):  # said once, when it is flagged
        shown._strike("[bold]agent-x", "[/]too fast")  # pylint: disable=protected-access
    assert out.getvalue() == "agent [bold]agent-x flagged: [/]too fast; its results are discarded from now on\n"
