"""README and docs/: the newcomer's commands stay at the top, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    ROOT / "CHANGES.md",
    ROOT / "deploy" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page."""
    out, fence = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"#{1,6} (.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: {target}"
        if anchor:
            assert anchor in anchors(dest), f"{page.name}: {target}"


def test_readme_starts_with_the_two_commands_and_keeps_the_streaming_examples():
    readme = (ROOT / "README.md").read_text()
    head = readme.split("\n## ", 2)[1]  # the first section
    assert head.startswith("Two commands") and "make demo" in head and "make test" in head
    for var in ("PORT=", "COG_PORT=", "PG_PORT="):
        assert var in head
    streaming = readme.split("## Streaming the COGs (pystac_client, QGIS, GDAL, rasterio)\n", 1)[1]
    assert "Client.open(" in streaming and "rasterio.open(href)" in streaming
    assert "docs/streaming.md" in streaming
    # every page of docs/ is linked from the README
    for page in (ROOT / "docs").glob("*.md"):
        assert f"](docs/{page.name})" in readme, page.name


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_performance_tables_are_the_ones_generated_from_the_committed_json():
    """README's short table and docs/performance.md's tile table are `run.py --markdown*` of the JSON they name."""
    bench = _bench_module()
    readme = (ROOT / "README.md").read_text()
    name = re.search(r"--markdown-summary benchmarks/results/([\w.-]+\.json)", readme).group(1)
    assert bench.markdown_table(ROOT / "benchmarks" / "results" / name, summary=True) in readme
    perf = (ROOT / "docs" / "performance.md").read_text()
    name = re.search(r"--markdown benchmarks/results/([\w.-]+\.json)", perf).group(1)
    rows = bench.markdown_table(ROOT / "benchmarks" / "results" / name).splitlines()
    missing = [r for r in rows[1:] if "raw stream" not in r and r not in perf.splitlines()]
    assert not missing, missing
