"""deploy/ checked statically (docker does not run here) and against a real /metrics scrape."""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from litestar import Litestar
from litestar.testing import TestClient

from server.engine.fake import FakeEngine
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "llm-server.json"


SCALEOUT = DEPLOY / "scaleout"
DEFAULT_SERVICES = {"api", "postgres", "redis", "prometheus", "grafana"}
SCALEOUT_SERVICES = {"gateway-1", "gateway-2", "proxy", "inference-1", "inference-2"}
GATEWAYS = ("gateway-1", "gateway-2")
INFERENCE = {"inference-1": "builtin:tiny-chat", "inference-2": "builtin:echo"}
# Fields of a [[models]] entry (the models file's documented fields and the remote-provider options).
MODEL_FIELDS = {"name", "backend", "model", "device", "dtype", "max_model_len", "base_url", "api_key_env",
                "upstream_model", "timeout_s", "max_concurrency", "retries", "health_interval_s"}  # fmt: skip


def load_compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return compose


def test_compose_parses_and_references_existing_files() -> None:
    compose = load_compose()
    every = compose["services"]
    # The default profile (services without `profiles`) is exactly what it was before the scale-out profile.
    services = {name: svc for name, svc in every.items() if not svc.get("profiles")}
    assert set(services) == DEFAULT_SERVICES
    for name, svc in every.items():
        assert "healthcheck" in svc, f"{name} has no health check"
    for name, svc in every.items():
        if "build" in svc:
            build = svc["build"]
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
            else:
                assert source in compose["volumes"], f"named volume {source} is not declared"
    env = services["api"]["environment"]
    # Secrets come from the environment, never literals in the file.
    assert env["LLM_SERVER_KEY_PEPPER"].startswith("${LLM_SERVER_KEY_PEPPER")
    assert "${POSTGRES_PASSWORD" in env["LLM_SERVER_DATABASE_URL"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")
    assert services["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_prometheus_config() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["api:8000"]
    # The scale-out gateways are found by DNS through their shared network alias (no target without the profile);
    # the inference servers are not scraped (the dashboard sums every target: requests would count twice).
    gateways = next(j for j in config["scrape_configs"] if j["job_name"] == "llm-server-gateways")
    services = load_compose()["services"]
    for name in GATEWAYS:
        assert gateways["dns_sd_configs"][0]["names"] == services[name]["networks"]["default"]["aliases"]
    assert gateways["dns_sd_configs"][0]["port"] == 8000
    assert not any(name in json.dumps(config) for name in INFERENCE)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (.ci/run installs Debian's prometheus package); YAML checked above")
    out = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_dashboard_metrics_exist_in_a_real_scrape(
    make_app: Callable[..., Litestar], api_key: str, tmp_path: Path
) -> None:
    with TestClient(make_app(FakeEngine(["a", "b"]))) as http:
        h = {"Authorization": f"Bearer {api_key}"}
        http.post(
            "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "x"}]}, headers=h
        )
        http.post(
            "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}, headers=h
        )
        scrape = http.get("/metrics").text
    exposed = {line.split("{")[0].split(" ")[0] for line in scrape.splitlines() if line and not line.startswith("#")}
    families = {line.split()[2] for line in scrape.splitlines() if line.startswith("# TYPE")}
    used = {m for expr in dashboard_exprs() for m in re.findall(r"\bllm_server_[a-z0-9_]+", expr)}
    assert used, "the dashboard queries no metric"
    missing = sorted(m for m in used if m not in exposed and m not in families)
    assert not missing, f"dashboard uses metrics the server does not expose: {missing}"
    # Every panel the issue asks for is there.
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    for needed in ("Request rate by status", "Time to first token", "Inter-token latency", "Generated tokens/s",
                   "Running / waiting requests", "Rate-limited and quota-exceeded", "Cache hit ratio",
                   "Errors by type", "Request latency (/v1)"):  # fmt: skip
        assert needed in titles
    promtool = shutil.which("promtool")
    if promtool is not None:  # PromQL syntax: promtool parses every expression as a recording rule
        rules = {"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:expr{i}", "expr": e.replace("$__rate_interval", "5m")}
            for i, e in enumerate(dashboard_exprs())
        ]}]}  # fmt: skip
        path = tmp_path / "rules.yml"
        path.write_text(yaml.safe_dump(rules))
        out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_containerfile_commands_match_the_readme() -> None:
    containerfile = (ROOT / "Containerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "uv sync --frozen" in containerfile and "uv sync --frozen" in readme
    assert 'ENTRYPOINT ["llm-server"]' in containerfile and 'CMD ["serve"]' in containerfile
    assert "llm-server serve" in readme
    assert re.search(r"^USER (?!root)\w+", containerfile, re.M), "the runtime stage must not run as root"
    assert containerfile.count("FROM ") >= 2, "multi-stage build"


def _env_names(value: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", value))


def test_scaleout_profile_services() -> None:
    compose = load_compose()
    services = compose["services"]
    profiled = {name for name, svc in services.items() if svc.get("profiles")}
    assert profiled == SCALEOUT_SERVICES
    for name in SCALEOUT_SERVICES:
        svc = services[name]
        assert svc["profiles"] == ["scaleout"], name
        assert svc["restart"] == "unless-stopped" and svc["stop_grace_period"] == "40s", name
        if name != "proxy":
            assert "ports" not in svc, f"{name} must be reachable only inside the compose network"
            assert svc["image"] == services["api"]["image"] and svc["build"] == services["api"]["build"]
            assert "/readyz" in " ".join(svc["healthcheck"]["test"])
    # Nothing in the default profile may need a profiled service.
    for name in DEFAULT_SERVICES:
        assert not set(services[name].get("depends_on", {})) & SCALEOUT_SERVICES, name

    for name in GATEWAYS:
        svc = services[name]
        env = svc["environment"]
        assert svc["command"] == ["serve", "--host", "0.0.0.0"] and "entrypoint" not in svc  # llm-server serve
        assert env["LLM_SERVER_DATABASE_URL"] == services["api"]["environment"]["LLM_SERVER_DATABASE_URL"]
        assert (
            env["LLM_SERVER_RATELIMIT_STORAGE_URI"]
            == services["api"]["environment"]["LLM_SERVER_RATELIMIT_STORAGE_URI"]
        )
        assert env["LLM_SERVER_KEY_PEPPER"].startswith("${LLM_SERVER_KEY_PEPPER")
        assert env["LLM_SERVER_LOG_FORMAT"] == "json"
        assert env["UPSTREAM_KEY"].startswith("${UPSTREAM_KEY")
        mounts = dict(v.split(":")[:2] for v in svc["volumes"])
        assert mounts["./scaleout/models.toml"] == env["LLM_SERVER_MODELS_FILE"]
        for dep in ("postgres", "redis"):
            assert svc["depends_on"][dep]["condition"] == "service_healthy"

    proxy = services["proxy"]
    assert proxy["image"].startswith("nginx:")
    assert proxy["ports"] == ["8080:8080"]
    assert "./scaleout/nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    assert {g: {"condition": "service_healthy"} for g in GATEWAYS} == proxy["depends_on"]

    volumes = set()
    for name, model in INFERENCE.items():
        svc = services[name]
        script = svc["command"][-1]
        provision = "llm-server keys create --name gateway --role admin --key-env UPSTREAM_KEY --if-missing"
        assert svc["entrypoint"] == ["sh", "-c"] and script.startswith(provision)
        assert script.endswith("&& exec llm-server serve --host 0.0.0.0")  # serves only once the key is there
        assert svc["environment"]["LLM_SERVER_MODEL"] == model
        assert svc["environment"]["UPSTREAM_KEY"].startswith("${UPSTREAM_KEY")
        assert "LLM_SERVER_DATABASE_URL" not in svc["environment"]  # its own SQLite file under /data
        (volume,) = svc["volumes"]
        assert volume.endswith(":/data") and volume.split(":")[0] in compose["volumes"]
        volumes.add(volume)
    assert len(volumes) == len(INFERENCE), "each inference server has its own data volume"


def test_compose_holds_no_secret_literals() -> None:
    compose = load_compose()
    for name, svc in compose["services"].items():
        for var, value in (svc.get("environment") or {}).items():
            if re.search(r"KEY|PASSWORD|PEPPER|TOKEN|SECRET", var) and value:
                assert str(value).startswith("${"), f"{name}: {var} must come from the environment"
    for path in (DEPLOY / "compose.yaml", SCALEOUT / "models.toml", SCALEOUT / "nginx.conf"):
        assert "sk-llm-" not in path.read_text(), path
    # Compose interpolates every service, profiled or not: a variable required (${VAR:?...}) only by the scale-out
    # profile would make the default `docker compose up` fail without it. Those containers check it themselves
    # (the gateway's models file names UPSTREAM_KEY; `keys create --key-env` refuses an unset variable).
    required = {
        profiled: {v for svc in compose["services"].values() if bool(svc.get("profiles")) == profiled
                   for v in re.findall(r"\$\{(\w+):\?", json.dumps(svc))}
        for profiled in (False, True)
    }  # fmt: skip
    assert required[True] <= required[False], required[True] - required[False]


def test_scaleout_models_file() -> None:
    services = load_compose()["services"]
    models = tomllib.loads((SCALEOUT / "models.toml").read_text())["models"]
    assert [m["name"] for m in models] == ["tiny", "echo"]
    upstreams = set()
    for m in models:
        assert set(m) <= MODEL_FIELDS, set(m) - MODEL_FIELDS
        assert m["backend"] == "openai"
        # Only the variable's name; the gateways get that variable from compose.
        assert m["api_key_env"] == "UPSTREAM_KEY" and "api_key" not in m
        for name in GATEWAYS:
            assert m["api_key_env"] in services[name]["environment"]
        match = re.fullmatch(r"http://([a-z0-9-]+):8000/v1", m["base_url"])
        assert match is not None and match.group(1) in INFERENCE, m["base_url"]
        upstreams.add(match.group(1))
        # The model id the inference server lists: its MODEL without the builtin: prefix.
        assert m["upstream_model"] == INFERENCE[match.group(1)].removeprefix("builtin:")
        for field in ("timeout_s", "max_concurrency", "retries", "health_interval_s"):
            assert isinstance(m.get(field, 1), int) and m.get(field, 1) >= 0, field
    assert upstreams == set(INFERENCE)


def _nginx_conf() -> str:
    return (SCALEOUT / "nginx.conf").read_text()


def test_nginx_config_streams_and_balances() -> None:
    conf = _nginx_conf()
    assert re.search(r"upstream gateways \{[^}]*server gateway-1:8000[^}]*server gateway-2:8000", conf)
    assert re.search(r"^\s*keepalive \d+;", conf, re.M), "keep-alive connections to the gateways"
    for directive in (
        "listen 8080;",
        "proxy_pass http://gateways;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_buffering off;",
        "proxy_cache off;",
        "gzip off;",
        "proxy_set_header Authorization $http_authorization;",
        "proxy_set_header X-Request-Id $http_x_request_id;",
        "proxy_set_header X-Forwarded-For $remote_addr;",
    ):
        assert directive in conf, directive
    read_timeout = re.search(r"proxy_read_timeout (\d+)s;", conf)
    assert read_timeout is not None and int(read_timeout.group(1)) >= 600  # longer than an upstream's timeout_s
    size = re.search(r"client_max_body_size (\d+)m;", conf)
    assert size is not None
    limit = Settings().request_max_body_size
    # At least the gateways' limit (so they answer 413 in the OpenAI shape), and not far above it.
    assert limit <= int(size.group(1)) * 1024 * 1024 < limit + 1024 * 1024


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx); the directives were checked as text")
    # The compose service names do not resolve here: point the upstream servers at local addresses.
    conf = re.sub(r"gateway-(\d):8000", r"127.0.0.1:800\1", _nginx_conf())
    (tmp_path / "nginx.conf").write_text(conf)
    out = subprocess.run(
        [nginx, "-t", "-q", "-e", "stderr", "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf"),
         "-g", f"pid {tmp_path}/nginx.pid;"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_docker_compose_accepts_both_profiles() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed; compose.yaml was checked as YAML")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60, check=False)
    if version.returncode != 0:
        pytest.skip("the docker compose plugin is not installed; compose.yaml was checked as YAML")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    env |= {name: "dummy" for name in ("POSTGRES_PASSWORD", "LLM_SERVER_KEY_PEPPER", "GRAFANA_ADMIN_PASSWORD")}
    base = [docker, "compose", "-f", str(DEPLOY / "compose.yaml")]
    # The default profile must not need the scale-out profile's UPSTREAM_KEY.
    for argv, extra in ((base, {}), ([*base, "--profile", "scaleout"], {"UPSTREAM_KEY": "dummy"})):
        out = subprocess.run(
            [*argv, "config", "-q"], env=env | extra, capture_output=True, text=True, timeout=60, check=False
        )
        assert out.returncode == 0, out.stdout + out.stderr


def _instructions(text: str) -> list[tuple[str, str]]:
    """The Containerfile as (INSTRUCTION, arguments) pairs: continuation lines joined, a heredoc's body appended."""
    out: list[tuple[str, str]] = []
    lines = iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        heredoc = re.search(r"<<-?'?(\w+)'?\s*$", line)
        if heredoc:
            body = []
            for body_line in lines:
                if body_line == heredoc.group(1):
                    break
                body.append(body_line)
            line = line + "\n" + "\n".join(body)
        keyword, _, args = line.strip().partition(" ")
        out.append((keyword.upper(), args))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    for keyword, args in _instructions((ROOT / "Containerfile").read_text()):
        if keyword == "FROM":
            current = stages.setdefault(args.split()[-1], [])
        elif stages:
            current.append((keyword, args))
    return stages


def _copy_sources(args: str) -> list[str]:
    words = [w for w in args.split() if not w.startswith("--")]
    return words[:-1]


def _dockerignored(path: str) -> bool:
    """Whether the .dockerignore patterns (no negations used) keep ``path`` out of the build context."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "a negated pattern would need a real matcher here"
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        anywhere = pattern.startswith("**/")
        pattern = pattern.removeprefix("**/")
        candidates = ["/".join(parts[i : j + 1]) for i in range(len(parts)) for j in range(i, len(parts))]
        if any(fnmatch.fnmatchcase(c, pattern) for c in (candidates if anywhere else prefixes)):
            return True
    return False


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_build_context() -> None:
    for path in (".venv", ".venv/bin/python", ".git", ".git/config", ".llm-server", ".llm-server/key_pepper",
                 ".env", "server/__pycache__/app.cpython-311.pyc", "tests/unit/test_cli.py", ".pytest_cache",
                 ".mypy_cache", ".ruff_cache", ".coverage", "htmlcov/index.html"):  # fmt: skip
        assert _dockerignored(path), f"{path} would be sent to the docker daemon"
    # What the Containerfile copies from the context is still there.
    copied = [s for stage in _stages().values() for kw, args in stage if kw == "COPY" and "--from" not in args
              for s in _copy_sources(args)]  # fmt: skip
    assert {"pyproject.toml", "uv.lock", "README.md", "server"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists() and not _dockerignored(source), source
    assert not _dockerignored("server/app.py") and not _dockerignored("migrations/env.py")


def test_dependency_layer_depends_only_on_the_lock_and_project_metadata() -> None:
    builder = _stages()["builder"]
    first_sync = next(i for i, (kw, args) in enumerate(builder) if kw == "RUN" and "uv sync" in args)
    copies = [_copy_sources(args) for kw, args in builder[:first_sync] if kw == "COPY"]
    assert sorted(s for c in copies for s in c) == ["pyproject.toml", "uv.lock"]
    dependency_run = builder[first_sync][1]
    assert "--mount=type=cache,target=/root/.cache/uv" in dependency_run
    for sync in re.findall(r"uv sync [^\n]*", dependency_run):
        assert "--frozen" in sync and "--no-dev" in sync and "--no-install-project" in sync, sync
    # The project's own install (which reads README.md through hatchling) comes after its sources.
    later = builder[first_sync + 1 :]
    copied_later = {s for kw, args in later if kw == "COPY" for s in _copy_sources(args)}
    assert {"README.md", "server", "schemas", "persistence", "migrations", "clients"} <= copied_later
    project_sync = next(args for kw, args in later if kw == "RUN" and "uv sync" in args)
    assert "--mount=type=cache,target=/root/.cache/uv" in project_sync and "--no-install-project" not in project_sync


def test_cpu_torch_build_argument_is_declared_documented_and_used() -> None:
    containerfile = (ROOT / "Containerfile").read_text()
    builder = _stages()["builder"]
    assert ("ARG", 'TORCH_INDEX=""') in builder, "empty by default: torch as locked"
    assert "--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu" in containerfile
    dependency_run = next(args for kw, args in builder if kw == "RUN" and "uv sync" in args)
    assert '--index "$TORCH_INDEX"' in dependency_run


def test_runtime_user_cannot_write_the_code_or_the_venv() -> None:
    runtime = _stages()["runtime"]
    users = [args for kw, args in runtime if kw == "USER"]
    assert users and users[-1] not in ("root", "0")
    for kw, args in runtime:
        if kw == "COPY":
            assert "--chown" not in args and "--chmod" not in args, args  # root-owned, read-only to the user
        if kw == "RUN":
            for chowned in re.findall(r"\bch(?:own|mod)\b[^&;\n]*", args):
                assert chowned.split()[-1] == "/data", chowned
    run = " ".join(args for kw, args in runtime if kw == "RUN")
    assert re.search(r"chown \S+ /data\b", run), "the runtime user writes /data"
    env = " ".join(args for kw, args in runtime if kw == "ENV")
    assert "LLM_SERVER_DATA_DIR=/data" in env and "HF_HOME=/data/" in env


def _compose_header() -> str:
    lines = (DEPLOY / "compose.yaml").read_text().splitlines()
    return "\n".join(line for line in itertools.takewhile(lambda line: line.startswith("#"), lines))


def test_compose_header_lists_every_variable_it_uses() -> None:
    used = _env_names(json.dumps(load_compose()))
    assert {"POSTGRES_PASSWORD", "LLM_SERVER_KEY_PEPPER", "GRAFANA_ADMIN_PASSWORD", "LLM_SERVER_MODEL"} <= used
    header = _compose_header()
    listed = set(re.findall(r"^#   ([A-Z][A-Z0-9_]+)  ", header, re.M))
    assert listed == used, f"listed but unused: {listed - used}; used but not listed: {used - listed}"
    # Choosing the model, and the secrets made on the spot for a first start.
    assert re.search(r"^#\s+LLM_SERVER_MODEL=\S+ docker compose -f deploy/compose.yaml up", header, re.M)
    for secret in ("POSTGRES_PASSWORD", "LLM_SERVER_KEY_PEPPER", "GRAFANA_ADMIN_PASSWORD"):
        assert f"{secret}=$(openssl rand -hex" in header, secret


def test_compose_gpu_reservation_example_is_valid_once_uncommented() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    block = re.search(r"^    # deploy:\n(?:    #  .*\n)+", text, re.M)
    assert block is not None, "no commented GPU reservation example under a service"
    uncommented = text.replace(block.group(0), re.sub(r"^    # ", "    ", block.group(0), flags=re.M))
    compose = yaml.safe_load(uncommented)
    services = [name for name, svc in compose["services"].items() if "deploy" in svc]
    assert services == ["api"]
    (device,) = compose["services"]["api"]["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
