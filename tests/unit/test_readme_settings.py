"""The documented settings are the settings: the reference table against ``Settings``, the production block of the
README against the ``.env`` reader.

The table lives in docs/REFERENCE.md. A row names its setting without the ``LLM_SERVER_`` prefix; a row may group
related settings (``HOST`` / ``PORT``), and a grouped name that starts with ``_`` continues the first one's prefix
(``DEFAULT_ROLE_RPM`` / ``_TPM`` is ``DEFAULT_ROLE_TPM``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec

from server.settings import ENV_PREFIX, Settings, load_settings, read_dotenv

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "REFERENCE.md"
README = ROOT / "README.md"
FIELDS = {f.name.upper(): f for f in msgspec.structs.fields(Settings)}


def section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    stop = re.compile(rf"^#{{1,{len(level)}}} ", re.M).search(text, start)
    return text[start : stop.start() if stop else len(text)]


def expand(cell: str) -> list[str]:
    """Setting names of a table's first cell: ``DEFAULT_ROLE_RPM`` / ``_TPM`` -> both full names."""
    names = re.findall(r"`([A-Z_][A-Z0-9_]*)`", cell)
    if names and names[0].startswith("_"):
        raise AssertionError(f"a row cannot start with a continuation: {cell}")
    full = []
    for name in names:
        if name.startswith("_"):
            name = names[0].rsplit("_", 1)[0] + name
        full.append(name)
    return full


def table_rows(text: str) -> list[tuple[list[str], str]]:
    """(setting names, default cell) of each row of the settings table."""
    rows = []
    for line in section(text, "## Settings").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0] in ("name", "") or set(cells[0]) <= set("-: "):
            continue
        rows.append((expand(cells[0]), cells[1]))
    return rows


def documented_default(value: Any) -> str | None:
    """How the table writes a field's default, or None when it is described in words (unset, derived, a path)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value or "empty"
    return None


def test_the_table_has_a_row_for_every_setting_and_only_for_settings() -> None:
    rows = table_rows(REFERENCE.read_text(encoding="utf-8"))
    documented = [name for names, _ in rows for name in names]
    assert len(documented) == len(set(documented)), "a setting has two rows"
    assert sorted(set(FIELDS) - set(documented)) == [], "settings without a row"
    assert sorted(set(documented) - set(FIELDS)) == [], "rows naming no setting"


def test_the_table_states_each_plain_default() -> None:
    for names, cell in table_rows(REFERENCE.read_text(encoding="utf-8")):
        parts = [p.strip() for p in cell.split(" / ")] if len(names) > 1 else [cell]
        assert len(parts) == len(names), f"{names}: one default per setting, got {cell!r}"
        for name, part in zip(names, parts, strict=True):
            expected = documented_default(FIELDS[name].default)
            if expected is None:
                continue
            shown = re.match(r"`([^`]*)`", part)
            stated = shown.group(1) if shown else part.split(" ")[0]
            assert stated == expected, f"{name}: the table says {part!r}, the default is {expected!r}"


def test_grouped_names_expand_against_the_first() -> None:
    assert expand("`DEFAULT_ROLE_RPM` / `_TPM` / `_MAX_CONCURRENCY`") == [
        "DEFAULT_ROLE_RPM",
        "DEFAULT_ROLE_TPM",
        "DEFAULT_ROLE_MAX_CONCURRENCY",
    ]
    assert expand("`HOST` / `PORT`") == ["HOST", "PORT"]


def test_the_production_block_pastes_into_a_dotenv_file(tmp_path: Path) -> None:
    production = section(README.read_text(encoding="utf-8"), "### Production settings")
    block = re.search(r"```dotenv\n(.*?)```", production, re.S)
    assert block is not None, "the production settings are a dotenv block"
    assert "$(" not in block.group(1) and "`" not in block.group(1), "a shell expression is not expanded in .env"
    dotenv = tmp_path / ".env"
    dotenv.write_text(block.group(1), encoding="utf-8")
    values = read_dotenv(dotenv)
    assert values and all(k.startswith(ENV_PREFIX) and k.removeprefix(ENV_PREFIX) in FIELDS for k in values)
    settings = load_settings(environ={}, dotenv=dotenv)
    assert settings.database.startswith("postgresql+asyncpg://")
    assert settings.key_pepper and " " not in settings.key_pepper and "#" not in settings.key_pepper
    assert settings.log_format == "json"


def test_a_missing_row_is_caught() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    without = re.sub(r"^\| `MAX_QUEUE_SIZE` \|.*\n", "", text, flags=re.M)
    assert without != text
    documented = {name for names, _ in table_rows(without) for name in names}
    assert "MAX_QUEUE_SIZE" in set(FIELDS) - documented
