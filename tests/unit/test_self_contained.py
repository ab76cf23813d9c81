"""Everything a user or contributor needs is in this repository: no tracked file points at a document outside it.

The project once leaned on a specification kept elsewhere; a reader of this repository has no such file. The names
below are assembled from parts so that this file does not match itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

OUTSIDE = (
    re.compile(re.escape("SPEC" + ".md")),
    re.compile("SPEC" + r"\s*§"),
    re.compile(re.escape("FACTS" + ".md")),
    re.compile(re.escape(".." + "/shared")),
    re.compile("steer" + "ing", re.IGNORECASE),
)
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
EXTERNAL_SCHEMES = ("http://", "https://", "mailto:")


def tracked_files() -> list[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the tracked files cannot be listed")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if listing.returncode != 0:
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    return [ROOT / name for name in listing.stdout.decode().split("\0") if name]


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file (or one deleted from the work tree but still tracked)."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def outside_references(text: str) -> list[str]:
    """Each mention of a document kept outside the repository, as ``line N: text``."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        if any(pattern.search(line) for pattern in OUTSIDE):
            found.append(f"line {number}: {line.strip()}")
    return found


def broken_links(markdown: Path, text: str) -> list[str]:
    """Relative links of a Markdown file whose target is not a file or folder inside the repository."""
    broken = []
    for target in MARKDOWN_LINK.findall(text):
        if target.startswith(EXTERNAL_SCHEMES) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        resolved = (ROOT / path.lstrip("/")) if path.startswith("/") else (markdown.parent / path)
        resolved = resolved.resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(target)
    return broken


def test_no_tracked_file_refers_to_a_document_outside_the_repository() -> None:
    offenders = {}
    for path in tracked_files():
        text = text_of(path)
        if text is not None and (found := outside_references(text)):
            offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, offenders


def test_markdown_links_point_inside_the_repository() -> None:
    offenders = {}
    for path in tracked_files():
        if path.suffix != ".md":
            continue
        text = text_of(path)
        if text is not None and (found := broken_links(path, text)):
            offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, offenders


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    assert outside_references("see " + "SPEC" + ".md for the contract")
    assert outside_references("as " + "SPEC" + " §4 says")
    assert outside_references("read .." + "/shared/notes.md")
    assert outside_references("the " + "steer" + "ing repository")
    assert not outside_references("static facts about the model; specification of the wire format")
    readme = ROOT / "README.md"
    assert broken_links(readme, "[a](docs/nowhere.md) [b](../elsewhere/x.md)") == [
        "docs/nowhere.md",
        "../elsewhere/x.md",
    ]
    assert broken_links(readme, "[a](docs/ARCHITECTURE.md#layers) [b](https://x.org/a.md) [c](#quickstart)") == []
