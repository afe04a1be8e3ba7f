"""The documentation's promises that a test can keep: the configuration reference lists every key of
the config with a meaning, the README stays short, user-facing text holds no development diary, and
every internal link of the README and the docs' pages leads to a file that exists. (`make docs`,
part of `make test`, builds the site with warnings as errors.)"""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest

from swap.config import Config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md",
         *sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts and "reference" not in p.parts)]


def _keys(obj, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out += _keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [f"{prefix}{f.name}"]
    return out


def test_the_configuration_reference_lists_every_key_with_its_default_and_meaning(tmp_path):
    from config_reference import rows, write_reference
    listed = {key: (kind, default, meaning) for key, kind, default, meaning in rows()}
    assert sorted(listed) == sorted(_keys(Config()))
    assert [k for k, (_, _, meaning) in listed.items() if not meaning] == []
    assert listed["phase1.batch_size"][:2] == ("int", "4096") and "global batch" in listed["phase1.batch_size"][2]
    assert listed["phase2.layout"][1] == "processes" and listed["data.dir"][1] == "null"
    write_reference(tmp_path / "config.md")
    page = (tmp_path / "config.md").read_text()
    assert all(f"| `{key}` |" in page for key in listed)


def test_the_readme_is_short_and_no_user_facing_text_tells_how_the_work_went():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
    diary = re.compile(r"issue #?\d|issues #\d|the commit that|lent to this|final code of", re.I)
    texts = [*PAGES, *sorted((ROOT / "swap").rglob("*.py"))]
    found = [f"{p.relative_to(ROOT)}:{n}" for p in texts if p.is_file()
             for n, line in enumerate(p.read_text().splitlines(), 1) if diary.search(line)]
    assert found == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_internal_link_leads_to_a_file(page):
    if not page.is_file():
        pytest.fail(f"{page.relative_to(ROOT)} is missing")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    missing = [link for link in local if not (page.parent / link).exists()]
    assert missing == []
