"""The README and docs/: the config reference agrees with the schemas, every link resolves,
and the README stays short enough to read in five minutes."""

from __future__ import annotations

import os
import re

import pytest
from conftest import REPO

from ckptkit import config_reference

PAGES = ["README.md"] + sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(REPO, "docs")))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    anchors, fenced = set(), False
    with open(path) as f:
        for line in f:
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced and line.startswith("#"):
                anchors.add(_slug(line.lstrip("#")))
    return anchors


def test_the_config_reference_is_the_schema():
    with open(os.path.join(REPO, "docs", "config-reference.md")) as f:
        page = f.read()
    assert page == config_reference.markdown(), (
        "docs/config-reference.md disagrees with the schemas in ckptkit/config.py: run "
        "python -m ckptkit.config_reference > docs/config-reference.md"
    )
    keys = [key for key, _, _ in config_reference.rows()]
    assert set(keys) == set(config_reference.MEANINGS), "every key has a meaning, and every meaning a key"
    assert {"trainer.max_steps", "checkpoint.on_data_change", "checkpoint.lock_lease_seconds", "export.from"} <= set(
        keys
    )


@pytest.mark.parametrize("page", PAGES)
def test_every_link_resolves(page):
    base = os.path.dirname(os.path.join(REPO, page))
    with open(os.path.join(REPO, page)) as f:
        text = f.read()
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")) or "=" in target:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(REPO, page)
        assert os.path.exists(full), f"{page}: link to {target} (no {full})"
        if anchor and full.endswith(".md"):
            assert anchor in _anchors(full), f"{page}: link to {target} (no heading #{anchor})"


def test_the_readme_is_short_and_links_every_page():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    assert text.count("\n") <= 300
    linked = {os.path.normpath(t.partition("#")[0]) for t in LINK.findall(text)}
    for page in PAGES[1:]:
        assert os.path.normpath(page) in linked, f"README.md does not link {page}"
