"""The project's documentation is in the repository and says what the code is.

- Nothing points at design notes outside the repository (a clone does not have them): every
  pointer goes to ``docs/``.
- Every relative link of ``README.md``, ``deploy/vm/README.md`` and ``docs/*.md`` leads to a
  file that exists.
- Every repository path the documents name in backticks exists, and the "Where is ..." table of
  ``docs/architecture.md`` names, for each mechanism, a file that defines the classes it lists.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
OWN_DOCS = ("architecture.md", "tcmu-ring.md", "vm-tier.md", "benchmarks.md")

# Directories that are built, cached or installed, not written by people (see .gitignore).
_SKIP_DIRS = frozenset({".git", ".venv", "build", "dist", "__pycache__", ".mypy_cache",
                        ".ruff_cache", ".pytest_cache", ".hypothesis", ".cache"})
# Spelled in pieces so that this file does not match itself.
_OUTSIDE = [("shared", "/docs"), ("tcmu-interface", ".md"), ("kernel-vm", ".md"),
            ("anchors", ".md")]
OUTSIDE_MARKERS = tuple((a + b).encode() for a, b in _OUTSIDE)

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_TOP_DIRS = ("initiator/", "tcmu_handler/", "hba/", "deploy/", "bench/", "tests/", "docs/",
             "research/")
_CODE = re.compile(r"`([^`\n]+)`")


def _source_files() -> Iterator[Path]:
    stack = [REPO]
    while stack:
        directory = stack.pop()
        for path in directory.iterdir():
            if path.is_dir():
                if path.name not in _SKIP_DIRS and not path.name.endswith(".egg-info"):
                    stack.append(path)
            elif path.is_file():
                yield path


def test_nothing_points_outside_the_repository() -> None:
    offenders = []
    for path in _source_files():
        data = path.read_bytes()
        for marker in OUTSIDE_MARKERS:
            if marker in data:
                offenders.append(f"{path.relative_to(REPO)} mentions {marker.decode()}")
    assert not offenders, "point at docs/ instead:\n" + "\n".join(offenders)


def _documents() -> list[Path]:
    return [REPO / "README.md", REPO / "deploy" / "vm" / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("document", _documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_to_files(document: Path) -> None:
    missing = []
    for target in _LINK.findall(document.read_text()):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        path = (document.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{document.relative_to(REPO)} links to missing files: {missing}"


def test_readme_lists_every_document_of_docs() -> None:
    readme = REPO / "README.md"
    linked = {(readme.parent / t).resolve() for t in _LINK.findall(readme.read_text())}
    unlisted = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlisted, f"README.md's Documentation section does not list {unlisted}"


@pytest.mark.parametrize("name", OWN_DOCS)
def test_repository_paths_named_in_docs_exist(name: str) -> None:
    missing = []
    for code in _CODE.findall((DOCS / name).read_text()):
        word = code.split()[0].rstrip(".,:;")
        if not word.startswith(_TOP_DIRS) or any(c in word for c in "*<>{}$"):
            continue
        if not (REPO / word).exists():
            missing.append(word)
    assert not missing, f"docs/{name} names paths that do not exist: {missing}"


def _where_is_rows() -> list[tuple[str, str, list[str]]]:
    text = (DOCS / "architecture.md").read_text()
    section = text.split("## Where is", 1)[1]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].startswith("`"):
            continue
        mechanism, file_cell, names_cell = cells
        rows.append((mechanism, file_cell.strip("`"), re.findall(r"`(\w+)`", names_cell)))
    return rows


def test_where_is_table_names_files_that_define_its_classes() -> None:
    rows = _where_is_rows()
    mechanisms = " ".join(m for m, _, _ in rows)
    for wanted in ("PDU layout", "Data-In placement", "Login state machine",
                   "Reinstatement policy", "Ring slot rule", "configfs registration"):
        assert wanted in mechanisms, f"the Where is table has no row for {wanted}"
    for mechanism, file, names in rows:
        source = REPO / file
        assert source.is_file(), f"{mechanism}: {file} does not exist"
        assert names, f"{mechanism}: no class named"
        text = source.read_text()
        for name in names:
            assert re.search(rf"^(class|def) {name}\b", text, re.MULTILINE), \
                f"{mechanism}: {file} defines no {name}"


_FAMILY = re.compile(r"\b(Counter|Gauge|Histogram|Info)MetricFamily\(\s*\"(iscsi_hba_\w+)\"")
_EXPOSED_SUFFIX = {"Counter": "_total", "Info": "_info", "Gauge": "", "Histogram": ""}


def _readme_metric_names() -> set[str]:
    """The metrics README.md's Prometheus table names; ``_suffix`` shorthands after a full
    name stand for that name's ``iscsi_hba_<group>`` plus the suffix."""
    names: set[str] = set()
    for line in (REPO / "README.md").read_text().splitlines():
        if not line.startswith("| `iscsi_hba_"):
            continue
        first_cell = line.split("|")[1]
        prefix = ""
        for word in _CODE.findall(first_cell):
            if word.startswith("iscsi_hba_"):
                prefix = "_".join(word.split("_")[:3])
                names.add(word)
            elif word.startswith("_") and prefix:
                names.add(prefix + word)
    return names


def test_readme_lists_every_metric_the_daemon_exports() -> None:
    source = (REPO / "hba" / "metrics.py").read_text()
    exported = {name + _EXPOSED_SUFFIX[kind] for kind, name in _FAMILY.findall(source)}
    assert len(exported) > 20, "the pattern no longer finds hba/metrics.py's families"
    listed = _readme_metric_names()
    assert not exported - listed, f"README.md's metrics table lacks {sorted(exported - listed)}"
    unknown = sorted(listed - exported)
    assert not unknown, f"README.md lists metrics not exported: {unknown}"


def test_daemon_help_says_all_a_reload_does() -> None:
    # As the README's daemon section: a reload also stops retrying entries no longer enabled,
    # and an entry refused for its credentials waits for one.
    from hba.cli import build_parser

    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        build_parser().parse_args(["daemon", "--help"])
    text = " ".join(out.getvalue().split())
    assert "tries at once those waiting to be tried again" in text
    assert "stops trying those no longer enabled" in text
    assert "credentials or initiator name is not (fix it, then SIGHUP)" in text


_FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.DOTALL)


@pytest.mark.parametrize("document", _documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_configuration_examples_parse(document: Path) -> None:
    # A newcomer copies them into /etc/iscsi-hba.conf: each must be a configuration the
    # daemon takes (the multipath design's example had an unquoted "a, b" address list).
    from hba.config import parse_config

    for block in _FENCE.findall(document.read_text()):
        if "TargetName" in block and "{" in block:
            parse_config(block, f"{document.relative_to(REPO)} example")
