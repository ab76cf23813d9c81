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
    re.compile(re.escape("SP" + "EC" + ".md")),
    re.compile("SP" + "EC" + r"\s*§"),
    re.compile(re.escape("FACTS" + ".md")),
    re.compile(re.escape(".." + "/shared")),
    re.compile("steer" + "ing", re.IGNORECASE),
    re.compile(r"\b" + "SP" + "EC" + r"\b"),
    re.compile(r"\b" + "issue" + r"\s*#?\d+", re.IGNORECASE),
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


def anchors(text: str) -> set[str]:
    """The fragments GitHub gives a Markdown file's headings (fenced code skipped; a repeated heading gets ``-1``)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        heading = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(markdown: Path, text: str, tracked: set[Path]) -> list[str]:
    """Relative links of a Markdown file whose target is not a tracked file or a folder holding one, or whose
    ``#fragment`` names no heading of the target Markdown file."""
    broken = []
    folders = {parent for path in tracked for parent in path.parents}
    for target in MARKDOWN_LINK.findall(text):
        if target.startswith(EXTERNAL_SCHEMES):
            continue
        path, _, fragment = target.partition("#")
        if not path:
            resolved = markdown
        elif path.startswith("/"):
            resolved = (ROOT / path.lstrip("/")).resolve()
        else:
            resolved = (markdown.parent / path).resolve()
        exists = resolved in tracked or resolved in folders
        if not exists or (fragment and resolved.suffix == ".md" and fragment not in anchors(resolved.read_text())):
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
    tracked = {path.resolve() for path in tracked_files()}
    offenders = {}
    for path in sorted(tracked):
        if path.suffix != ".md":
            continue
        text = text_of(path)
        if text is not None and (found := broken_links(path, text, tracked)):
            offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, offenders


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    assert outside_references("see " + "SP" + "EC" + ".md for the contract")
    assert outside_references("as " + "SP" + "EC" + " §4 says")
    assert outside_references("read .." + "/shared/notes.md")
    assert outside_references("the " + "steer" + "ing repository")
    assert outside_references("the contract of " + "SP" + "EC" + " 4.2")
    assert outside_references("fixed for " + "issue" + " 18") and outside_references("Issue" + " #7 asked for it")
    assert not outside_references("static facts about the model; specification of the wire format; the issues it has")
    readme = ROOT / "README.md"
    tracked = {readme, ROOT / "docs" / "REFERENCE.md", ROOT / "server" / "app.py"}
    assert broken_links(readme, "[a](docs/nowhere.md) [b](../elsewhere/x.md) [c](.llm-server)", tracked) == [
        "docs/nowhere.md",
        "../elsewhere/x.md",
        ".llm-server",
    ]
    fine = (
        "[a](docs/REFERENCE.md#settings) [b](https://x.org/a.md) [c](#quickstart) [d](server) [e](/docs/REFERENCE.md)"
    )
    assert broken_links(readme, fine, tracked) == []
    assert broken_links(readme, "[a](docs/REFERENCE.md#no-such-heading) [b](#nowhere)", tracked) == [
        "docs/REFERENCE.md#no-such-heading",
        "#nowhere",
    ]
    headings = (
        "# A title\n## Tracing (OpenTelemetry)\n```bash\n# not a heading\n```\n## Which `x` do I use when…\n# A title"
    )
    assert anchors(headings) == {"a-title", "tracing-opentelemetry", "which-x-do-i-use-when", "a-title-1"}
