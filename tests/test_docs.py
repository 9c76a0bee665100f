"""The README and docs/: the generated references match their sources, links resolve, and the README stays one
screen's worth with the parts, ports and the steps a newcomer needs."""
import dataclasses
import re
from pathlib import Path

from tunefarm import docs

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_generated_references_match_the_job_spec_and_the_cli():
    for rel, text in docs.generated().items():
        path = ROOT / rel
        assert path.is_file(), f"{rel} is missing: run python -m tunefarm.docs"
        assert path.read_text() == text, f"{rel} differs from its sources: run python -m tunefarm.docs"


def test_every_job_field_has_its_text_and_no_text_names_a_gone_field():
    from tunefarm.core import jobspec

    fields = {"name", "target"}
    for top in dataclasses.fields(jobspec.TuningJob):
        cls = getattr(jobspec, str(top.type), None)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            fields |= {f"{top.name}.{f.name}" for f in dataclasses.fields(cls)}
    assert fields == set(docs.JOB_FIELD_DOCS)
    reference = docs.job_file_reference()
    for name in fields:
        assert f"| `{name}` |" in reference


def test_cli_reference_names_every_command_and_option():
    import click

    from tunefarm.cli import main

    reference = docs.cli_reference()

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            path = f"{prefix} {name}".strip()
            assert f"### `tunefarm {path}`" in reference, path
            for param in cmd.params:
                if isinstance(param, click.Option) and not param.hidden:
                    assert any(opt in reference for opt in param.opts), (path, param.opts)
            if isinstance(cmd, click.Group):
                walk(cmd, path)

    walk(main, "")


def test_readme_is_short_and_has_the_parts_ports_and_first_steps():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    for needed in (":9190", ":9090", ":9180", "[farm key]", "[token]", "make quickstart", "make test",
                   "## Add a device", "## Tune from a laptop", "## Pull and apply", "placement.json",
                   "compile_pulled", "tunefarm submit", "tunefarm pull"):
        assert needed in text, needed
    # the farm-key copy step, in the steps themselves (not only in docs/security.md)
    for section in ("## Add a device", "## Tune from a laptop"):
        body = text.split(section, 1)[1].split("\n## ", 1)[0]
        assert "farm.key" in body and "scp" in body, section


def _anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_links_between_pages_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            assert dest.exists(), f"{page.relative_to(ROOT)} links to {target}: no such file"
            if anchor:
                headings = [line.lstrip("#") for line in dest.read_text().splitlines() if line.startswith("#")]
                assert anchor in {_anchor(h) for h in headings}, f"{page.relative_to(ROOT)}: no heading #{anchor}"


def test_no_commit_hashes_or_dates_in_the_prose():
    """Figures with their dates and commits belong in bench/results, which the pages link to."""
    date = re.compile(r"\b20\d\d-\d\d-\d\d\b")
    commit = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
    for page in PAGES:
        text = page.read_text()
        assert not date.search(text), (page.name, date.search(text))
        assert not commit.search(text), (page.name, commit.search(text))


def test_the_index_of_bench_results_is_current_and_job_data_stays_small():
    from bench import index, ttq_data

    assert index.INDEX.read_text() == index.render(), "bench/results/INDEX.md is out of date: run python -m bench.index"
    listed = {name for name, _, _ in index.results()}
    assert "search_scaling-h100vm-16c-profile" in listed and "compare-ttq-resnet-cpu" in listed
    archives = ttq_data.archives()
    assert archives and sum(a.stat().st_size for a in archives) < ttq_data.LIMIT_BYTES


def test_ttq_archives_hold_only_the_job_data_the_results_read(tmp_path):
    import shutil

    from bench import ttq_data

    for archive in ttq_data.archives():
        copy = tmp_path / archive.name
        shutil.copy(archive, copy)
        run = ttq_data.unpack(copy)
        files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
        allowed = set(ttq_data.RUN_FILES) | {f"{ttq_data.JOB_DIR}/{n}" for n in ttq_data.JOB_FILES}
        assert set(files) <= allowed and "ttq/database_tuning_record.json" in files, (archive.name, files)
        assert ttq_data.unpack(copy) is None  # an unpacked directory is kept as it is
