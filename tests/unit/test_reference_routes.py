"""The routes table of docs/REFERENCE.md against the routes the app serves (method and path).

Path parameters are compared without their names or types (``{id}`` matches ``{response_id:str}``); the OpenAPI
document's own sub-pages (``/schema/swagger`` …) are covered by the ``/schema`` row.
"""

from __future__ import annotations

import re
from pathlib import Path

from server.app import create_app
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "REFERENCE.md"
ROUTE = re.compile(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`?\s]*)[^`]*`")


def shape(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def served(data_dir: Path) -> set[tuple[str, str]]:
    app = create_app(Settings(model="builtin:echo", data_dir=data_dir))
    return {
        (method, shape(route.path))
        for route in app.routes
        for method in getattr(route, "methods", ())
        if method not in ("OPTIONS", "HEAD") and not route.path.startswith("/schema/")
    }


def documented(text: str) -> set[tuple[str, str]]:
    start = text.index("\n## Routes\n")
    end = text.index("\n## ", start + 1)
    rows = [line for line in text[start:end].splitlines() if line.startswith("| `")]
    return {(method, shape(path)) for row in rows for method, path in ROUTE.findall(row.split(" | ")[0])}


def test_every_route_has_a_row_and_every_row_is_a_route(tmp_path: Path) -> None:
    assert documented(REFERENCE.read_text(encoding="utf-8")) == served(tmp_path)


def test_a_row_names_each_method_and_path() -> None:
    row = "| `GET /v1/responses/{id}`, `DELETE /v1/responses/{id}` | a stored response |\n"
    assert documented(f"\n## Routes\n\n{row}\n## Next\n") == {
        ("GET", "/v1/responses/{}"),
        ("DELETE", "/v1/responses/{}"),
    }
    assert documented("\n## Routes\n\n| `GET /admin/usage?key=&month=` | usage |\n\n## Next\n") == {
        ("GET", "/admin/usage")
    }
