"""pyproject.toml against the code: what the wheel ships imports only what it declares, tests only what dev declares.

Every import is read with ``ast`` (module level and inside functions alike: a lazy import of an undeclared package
fails just as late in a user's install), its top-level name mapped to the installed distribution that provides it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
FIRST_PARTY = {"server", "schemas", "persistence", "migrations", "clients", "tests", "benchmarks"}


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


RUNTIME = _names(PYPROJECT["project"]["dependencies"])
EXTRAS = {extra: _names(reqs) for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items()}
DEV = _names(PYPROJECT["dependency-groups"]["dev"])


def _imported_modules(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def _undeclared(files: list[Path], allowed: set[str]) -> dict[str, set[str]]:
    """Third-party modules imported by ``files`` that no distribution in ``allowed`` provides, with their files."""
    providers = importlib.metadata.packages_distributions()
    missing: dict[str, set[str]] = {}
    for path in files:
        for module in _imported_modules(path):
            if module in sys.stdlib_module_names or module in FIRST_PARTY or module == "__future__":
                continue
            if not {canonicalize_name(d) for d in providers.get(module, [])} & allowed:
                missing.setdefault(module, set()).add(str(path.relative_to(ROOT)))
    return missing


def _shipped_packages() -> list[str]:
    packages: list[str] = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    return packages


def test_the_wheel_ships_the_first_party_packages() -> None:
    shipped = _shipped_packages()
    assert set(shipped) == FIRST_PARTY - {"tests", "benchmarks"}
    for package in shipped:
        assert (ROOT / package / "__init__.py").is_file(), package


@pytest.mark.parametrize("package", _shipped_packages())
def test_shipped_modules_import_only_runtime_dependencies(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    # The runnable examples in clients/ may use the `clients` extra (pip install '.[clients]' from a checkout).
    allowed = RUNTIME | EXTRAS[package] if package in EXTRAS else RUNTIME
    assert _undeclared(files, allowed) == {}


def test_the_native_client_needs_no_extra() -> None:
    assert _undeclared([ROOT / "clients" / "__init__.py", ROOT / "clients" / "native.py"], RUNTIME) == {}


def test_the_clients_extra_is_needed_and_also_in_dev() -> None:
    # The extra's packages are what the examples import beyond the runtime (none is dead weight), and the tests
    # that run the examples find them in the dev group.
    examples = sorted((ROOT / "clients").glob("*.py"))
    assert set(_undeclared(examples, RUNTIME)) == {"openai", "langchain_openai"}
    assert EXTRAS["clients"] <= DEV


@pytest.mark.parametrize("folder", ["tests", "benchmarks"])
def test_tests_and_benchmarks_import_only_declared_distributions(folder: str) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    assert _undeclared(files, RUNTIME | DEV | set().union(*EXTRAS.values())) == {}


def _declared(name: str) -> SpecifierSet:
    (requirement,) = (
        Requirement(r) for r in PYPROJECT["project"]["dependencies"] if canonicalize_name(Requirement(r).name) == name
    )
    return requirement.specifier


def _bounds(specifiers: SpecifierSet) -> tuple[Version | None, Version | None]:
    """The lowest and highest version a set of ``>=``/``>``/``<``/``<=``/``==`` specifiers admits (None: unbounded)."""
    lower = [Version(s.version) for s in specifiers if s.operator in (">=", ">", "==", "~=")]
    upper = [Version(s.version) for s in specifiers if s.operator in ("<", "<=", "==")]
    assert all(s.operator in (">=", ">", "<", "<=", "==", "~=", "!=") for s in specifiers), specifiers
    return max(lower, default=None), min(upper, default=None)


@pytest.mark.parametrize("name", ["tokenizers", "huggingface-hub"])
def test_bound_is_within_what_the_pinned_transformers_requires(name: str) -> None:
    transformers = importlib.metadata.version("transformers")
    assert _declared("transformers").contains(transformers), "the installed transformers is the pinned series"
    required = SpecifierSet()
    for text in importlib.metadata.requires("transformers") or []:
        requirement = Requirement(text)
        applies = requirement.marker is None or requirement.marker.evaluate()  # not behind one of its extras
        if canonicalize_name(requirement.name) == name and applies:
            required &= requirement.specifier
    assert str(required), f"transformers {transformers} no longer requires {name}: drop or revisit the bound"
    declared = _declared(name)
    (low, high), (req_low, req_high) = _bounds(declared), _bounds(required)
    assert req_low is None or (low is not None and low >= req_low), (str(declared), str(required))
    assert req_high is None or (high is not None and high <= req_high), (str(declared), str(required))
    installed = importlib.metadata.version(name)
    assert declared.contains(installed) and required.contains(installed)


def test_license_file_matches_the_project_metadata() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    for section in ("1. Definitions.", "2. Grant of Copyright License.", "3. Grant of Patent License.",
                    "9. Accepting Warranty or Additional Liability.", "END OF TERMS AND CONDITIONS"):  # fmt: skip
        assert section in text, section
    metadata = importlib.metadata.metadata("llm-server")
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
