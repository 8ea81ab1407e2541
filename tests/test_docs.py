"""The documentation matches the repository: every shipped config is described, every results page
is current, the README stays short."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def expand(pattern: str) -> list[str]:
    """``a/{b,c}.yaml`` -> ``a/b.yaml``, ``a/c.yaml`` (the configs page names families this way)."""
    parts = re.split(r"\{([^}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def test_every_shipped_config_is_on_the_configs_page():
    page = (REPO / "docs" / "configs.md").read_text()
    named = {name for pattern in re.findall(r"`(configs/[^`]+\.yaml)`", page) for name in expand(pattern)}
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped - named == set(), "configs missing from docs/configs.md"
    assert named - shipped == set(), "docs/configs.md names configs that do not exist"


def test_results_pages_and_the_readme_table_match_benchmarks_results():
    check = subprocess.run(
        [sys.executable, "benchmarks/publish.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_readme_is_short_and_keeps_no_history_or_timings():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert not re.search(r"\b[0-9a-f]{7,40}\b", readme), "a commit hash in the README"
    assert not re.search(r"\d+(\.\d+)? ?(min|minutes|s|seconds|hours?)\b", readme), "a run time in the README"
