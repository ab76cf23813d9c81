"""The README's quickstart as a newcomer runs it: the variables it exports and its curl, openai SDK and LangChain
calls, run as written (each block in its own process) against a live server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from litestar import Litestar

from server.settings import Settings
from tests.live import live_server

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SCRIPT = ["Hel", "lo"]  # what the fake engine answers: "Hello"


def section(heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level (code blocks skipped: a
    ``# comment`` in one is no heading)."""
    level = len(heading.split(" ", 1)[0])
    lines = README[README.index(f"\n{heading}\n") + len(heading) + 2 :].splitlines(keepends=True)
    kept, fenced = [], False
    for line in lines:
        fenced ^= line.startswith("```")
        if not fenced and re.match(rf"#{{1,{level}}} ", line):
            break
        kept.append(line)
    return "".join(kept)


def block(text: str, language: str) -> str:
    (found,) = re.findall(rf"```{language}\n(.*?)```", text, re.S)
    return str(found)


def exported(text: str) -> dict[str, str]:
    """``export NAME=value`` lines of the bash blocks of ``text`` (the last value of each name)."""
    names: dict[str, str] = {}
    for code in re.findall(r"```bash\n(.*?)```", text, re.S):
        for name, value in re.findall(r"^export (\w+)=(\S+)", code, re.M):
            names[name] = value
    return names


@pytest.fixture
def quickstart_env(make_app: Callable[..., Litestar], api_key: str) -> Iterator[dict[str, str]]:
    """The environment the quickstart leaves in the second terminal, pointed at a live server serving ``tiny-chat``."""
    with live_server(make_app(script=SCRIPT, served_model_name="tiny-chat")) as base:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_") and "proxy" not in k.lower()}
        variables = exported(section("## Quickstart"))
        yield env | variables | {"OPENAI_API_KEY": api_key, "OPENAI_BASE_URL": f"{base}/v1"}


def test_the_quickstart_exports_what_the_sdk_reads_and_serve_s_defaults() -> None:
    variables = exported(section("## Quickstart"))
    assert set(variables) == {"OPENAI_API_KEY", "OPENAI_BASE_URL", "MODEL"}
    defaults = Settings()
    assert variables["OPENAI_BASE_URL"] == f"http://{defaults.host}:{defaults.port}/v1"
    assert defaults.model == "builtin:tiny-chat" and variables["MODEL"] == "tiny-chat"
    assert variables["OPENAI_API_KEY"].startswith("sk-llm-")
    # Step 2's two ways to a key both end with the key exported in the second terminal.
    step2 = README[README.index("**2. Make a key.**") : README.index("**3. Call it.**")]
    assert "keys create --name me --role admin" in step2 and "keys generate" in step2
    assert "serve --api-key sk-llm-..." in step2


def test_the_curl_calls_run_as_written(quickstart_env: dict[str, str]) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    code = block(section("### curl"), "bash")
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code], env=quickstart_env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert '"content":"Hello"' in out.stdout and '"model":"tiny-chat"' in out.stdout
    assert out.stdout.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("heading", ["### openai SDK", "### LangChain"])
def test_the_python_examples_run_as_written(quickstart_env: dict[str, str], heading: str) -> None:
    code = block(section(heading), "python")
    out = subprocess.run(
        [sys.executable, "-c", code], env=quickstart_env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Hello\nHello"  # the answer, then the same answer streamed
