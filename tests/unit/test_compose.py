"""docker-compose.yml: the production wiring, checked where no Docker engine can run it.

`docker-compose config` proves the file is valid compose; it cannot see the contracts between the
services that make the nightly loop work: vLLM must read adapters at the path the worker writes them,
every URL must name the right service, driver and database, MLflow must accept the Host header the
worker sends, and every variable must have a value in `.env.example`. These tests read the file as
compose does (YAML first, then `${VAR}` interpolated with `.env.example`'s values) and check those.
When docker-compose is installed (scripts/check_compose.sh installs it in CI) it validates the file too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
INIT_SQL = ROOT / "docker" / "postgres-init.sql"
SERVICES = {"postgres", "mlflow", "prefect-server", "worker", "vllm", "gateway"}
# `$$` (a literal dollar), `${NAME}`, `${NAME:-default}` and friends, or `$NAME`: compose's syntax.
VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_]\w*))"
)
ENV_LINE = re.compile(r"^(?P<key>[A-Z_][A-Z0-9_]*)=(?P<value>[^\s#'\"]*)$")


# -- reading the file as compose does ----------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines without quotes or inline comments: read alike by compose v1 and v2."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        match = ENV_LINE.match(line)
        assert match, f"{path.name}:{number}: not a plain KEY=VALUE line: {line!r}"
        values[match["key"]] = match["value"]
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"], match["arg"]
        value = env.get(name)
        if op in {":-", "-"} and (value is None or (op == ":-" and value == "")):
            return arg
        if value is None or (op == ":?" and value == ""):
            raise KeyError(f"${{{name}}} has no value")
        return value

    return VARIABLE.sub(substitute, text)


def variables_in(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(variables_in(value) for value in node.values()), set())
    if isinstance(node, list):
        return set().union(*(variables_in(item) for item in node), set())
    if isinstance(node, str):
        return {m["braced"] or m["bare"] for m in VARIABLE.finditer(node) if not m["escaped"]}
    return set()


def interpolated(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolated(item, env) for item in node]
    return interpolate(node, env) if isinstance(node, str) else node


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(raw_compose: dict[str, Any], env_example: dict[str, str]) -> dict[str, dict[str, Any]]:
    return interpolated(raw_compose, env_example)["services"]


# -- small accessors ---------------------------------------------------------------------------------


def argument(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) for short and long volume syntax."""
    found: dict[str, tuple[str, bool]] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
        else:
            source, target, *mode = volume.split(":")
            found[target] = (source, mode == ["ro"])
    return found


def published_container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(port).rsplit(":", 1)[-1]) for port in service.get("ports", [])}


def healthcheck_url(service: dict[str, Any]) -> str:
    probe = " ".join(service["healthcheck"]["test"])
    match = re.search(r"https?://[^'\" ]+", probe)
    assert match, f"no URL in healthcheck {probe!r}"
    return match.group(0)


def created_databases() -> set[str]:
    return set(re.findall(r"CREATE DATABASE (\w+);", INIT_SQL.read_text(encoding="utf-8")))


def database_urls(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {
        "mlflow": argument(services["mlflow"]["command"], "--backend-store-uri"),
        "prefect-server": services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"],
        "worker": services["worker"]["environment"]["OVERNIGHT_DATABASE__URL"],
    }


# -- structure ---------------------------------------------------------------------------------------


def test_six_services_each_with_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == SERVICES
    for name, service in services.items():
        check = service.get("healthcheck", {})
        assert check.get("test") and check["test"][0] == "CMD", name
        assert not check.get("disable"), name


@pytest.mark.parametrize("name", ["mlflow", "prefect-server", "vllm", "gateway"])
def test_http_healthchecks_probe_the_port_the_service_publishes(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    url = urlsplit(healthcheck_url(services[name]))
    assert url.hostname == "127.0.0.1"
    assert url.port in published_container_ports(services[name])


def test_named_volumes_hold_the_state(raw_compose: dict[str, Any], services: dict[str, Any]) -> None:
    named = set(raw_compose["volumes"])
    assert {"postgres-data", "mlflow-artifacts", "overnight-home", "hf-cache"} <= named
    assert mounts(services["postgres"])["/var/lib/postgresql/data"][0] == "postgres-data"
    artifacts = argument(services["mlflow"]["command"], "--artifacts-destination")
    assert mounts(services["mlflow"])[artifacts][0] == "mlflow-artifacts"
    for name in ("worker", "vllm"):
        assert mounts(services[name])["/root/.cache/huggingface"][0] == "hf-cache", name


def test_vllm_reads_adapters_where_the_worker_writes_them(services: dict[str, dict[str, Any]]) -> None:
    home = services["worker"]["environment"]["OVERNIGHT_HOME"]
    worker_source, worker_read_only = mounts(services["worker"])[home]
    vllm_source, vllm_read_only = mounts(services["vllm"])[home]
    assert worker_source == vllm_source == "overnight-home"
    assert not worker_read_only and vllm_read_only


def test_postgres_init_creates_every_database_the_services_use(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]["environment"]
    assert postgres["POSTGRES_DB"] not in created_databases()  # the image would create it first
    for name, url in database_urls(services).items():
        parts = urlsplit(url)
        assert parts.hostname == "postgres" and parts.port == 5432, name
        assert (parts.username, parts.password) == (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"])
        assert parts.path.lstrip("/") in created_databases(), name
    init = mounts(services["postgres"])["/docker-entrypoint-initdb.d/10-overnight.sql"]
    assert (ROOT / init[0]).resolve() == INIT_SQL and init[1]


def test_each_service_uses_its_own_driver(services: dict[str, dict[str, Any]]) -> None:
    schemes = {name: urlsplit(url).scheme for name, url in database_urls(services).items()}
    assert schemes == {
        "mlflow": "postgresql",
        "prefect-server": "postgresql+asyncpg",
        "worker": "postgresql+psycopg",
    }


def test_mlflow_serves_artifacts_and_accepts_the_workers_host_header(
    services: dict[str, dict[str, Any]],
) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    command = services["mlflow"]["command"]
    assert "--serve-artifacts" in command
    allowed = argument(command, "--allowed-hosts").split(",")
    worker_host = urlsplit(services["worker"]["environment"]["OVERNIGHT_MLFLOW__TRACKING_URI"]).netloc
    assert is_allowed_host_header(allowed, worker_host)
    assert is_allowed_host_header(allowed, f"127.0.0.1:{argument(command, '--port')}")
    assert not is_allowed_host_header(allowed, "attacker.example:5000")


def test_prefect_server_listens_where_the_worker_calls_it(services: dict[str, dict[str, Any]]) -> None:
    command = services["prefect-server"]["command"]
    assert command[:3] == ["prefect", "server", "start"] and argument(command, "--host") == "0.0.0.0"
    api = urlsplit(services["worker"]["environment"]["PREFECT_API_URL"])
    assert (api.hostname, api.port, api.path) == ("prefect-server", int(argument(command, "--port")), "/api")


def test_worker_env_loads_into_a_config_pointing_at_the_services(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    environment = {key: str(value) for key, value in services["worker"]["environment"].items()}
    empty = tmp_path / "overnight.yaml"
    empty.write_text("")
    config = load_config(empty, environ=environment)
    assert config.home == "/data/overnight"
    assert (
        config.database.url.startswith("postgresql+psycopg://") and "@postgres:5432/" in config.database.url
    )
    assert config.mlflow.tracking_uri == "http://mlflow:5000"
    assert config.serving.endpoints == ["http://vllm:8000"]
    vllm = services["vllm"]["command"]
    assert config.serving.base_model == vllm[0]  # `vllm serve MODEL`
    assert config.serving.base_name == argument(vllm, "--served-model-name")
    assert config.serving.max_loras == int(argument(vllm, "--max-loras"))
    assert config.serving.max_lora_rank == int(argument(vllm, "--max-lora-rank"))
    assert config.serving.api_key is not None and config.judge.api_key is not None
    assert config.serving.api_key.get_secret_value() == argument(vllm, "--api-key")
    assert config.judge.api_key.get_secret_value() == argument(vllm, "--api-key")


def test_gateway_fronts_vllm_on_the_workers_store_and_routes(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    gateway, worker = services["gateway"], services["worker"]
    assert gateway["image"] == worker["image"]  # the worker's image, running only `overnight gateway`
    assert gateway["command"][-1] == "gateway" and "build" not in gateway
    environment = {key: str(value) for key, value in gateway["environment"].items()}
    empty = tmp_path / "overnight.yaml"
    empty.write_text("")
    config = load_config(empty, environ=environment)
    assert config.database.url == worker["environment"]["OVERNIGHT_DATABASE__URL"]  # routes, keys, log
    assert config.serving.endpoints == yaml.safe_load(worker["environment"]["OVERNIGHT_SERVING__ENDPOINTS"])
    assert config.serving.base_name == argument(services["vllm"]["command"], "--served-model-name")
    assert config.serving.api_key is not None
    assert config.serving.api_key.get_secret_value() == argument(services["vllm"]["command"], "--api-key")
    assert config.gateway.require_keys and config.gateway.host == "0.0.0.0"
    assert config.gateway.port in published_container_ports(gateway)
    # The spool (exchanges the store could not take yet) survives a restart of the container.
    assert mounts(gateway)[str(Path(config.gateway.spool_dir).parent)][0] == "gateway-spool"
    # It needs the current schema: the worker is healthy only after `overnight db upgrade`.
    assert gateway["depends_on"]["worker"]["condition"] == "service_healthy"
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_worker_migrates_then_schedules_with_the_mounted_config(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    script = " ".join(worker["command"])
    assert worker["entrypoint"] == ["/bin/sh", "-c"]
    upgrade, schedule = script.index("db upgrade"), script.index("schedule")
    assert upgrade < schedule and "&&" in script[upgrade:schedule]
    config_paths = set(re.findall(r"--config (\S+)", script))
    assert len(config_paths) == 1
    source, read_only = mounts(worker)[config_paths.pop()]
    assert read_only and source.endswith("overnight.yaml")


def test_worker_waits_for_healthy_backends(services: dict[str, dict[str, Any]]) -> None:
    depends = services["worker"]["depends_on"]
    for name in ("postgres", "mlflow", "prefect-server"):
        assert depends[name]["condition"] == "service_healthy", name
    assert depends["vllm"]["condition"] in {"service_started", "service_healthy"}
    assert services["worker"]["environment"]["PREFECT_RUNNER_SERVER_ENABLE"] == "true"
    runner_port = services["worker"]["environment"]["PREFECT_RUNNER_SERVER_PORT"]
    assert urlsplit(healthcheck_url(services["worker"])).port == int(runner_port)


def test_vllm_serves_runtime_lora_on_a_gpu(services: dict[str, dict[str, Any]]) -> None:
    vllm = services["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:") and vllm["entrypoint"] == ["vllm", "serve"]
    assert "--enable-lora" in vllm["command"]
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # A deploy loads pinned names and flips the gateway's route: no dev endpoint is needed.
    assert "VLLM_SERVER_DEV_MODE" not in vllm["environment"]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] and device["driver"] == "nvidia" for device in devices)
    endpoint = urlsplit(yaml.safe_load(services["worker"]["environment"]["OVERNIGHT_SERVING__ENDPOINTS"])[0])
    assert (endpoint.hostname, endpoint.port) == ("vllm", int(argument(vllm["command"], "--port")))


# -- variables ---------------------------------------------------------------------------------------


def test_every_variable_is_defined_in_env_example(
    raw_compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    used = variables_in(raw_compose)
    assert used, "the compose file should take its settings from variables"
    assert sorted(used - set(env_example)) == []
    assert sorted(set(env_example) - used) == []  # no setting in .env.example that nothing reads


def test_image_tags_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        tag = service["image"].rsplit(":", 1)[-1] if ":" in service["image"] else ""
        assert tag and tag != "latest", f"{name}: {service['image']}"


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("a${SET}b$SET $$SET", env) == "avbv $SET"
    assert interpolate("${EMPTY:-d} ${EMPTY-d} ${UNSET-d}", env) == "d  d"
    with pytest.raises(KeyError, match="UNSET"):
        interpolate("${UNSET}", env)
    assert variables_in({"a": ["${X} $$Y $Z"], "b": 1}) == {"X", "Z"}


# -- the real docker-compose -------------------------------------------------------------------------


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found:
        return found
    reason = "docker-compose is not installed (bash scripts/check_compose.sh installs it as root)"
    if os.environ.get("CI") in {"true", "1"}:
        pytest.fail(f"{reason}; CI must validate the compose file")
    pytest.skip(reason)


def compose_config(compose_file: Path) -> subprocess.CompletedProcess[str]:
    command = [docker_compose(), "--env-file", str(ENV_EXAMPLE), "--project-directory", str(ROOT)]
    return subprocess.run(
        [*command, "-f", str(compose_file), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_docker_compose_accepts_the_file() -> None:
    result = compose_config(COMPOSE_FILE)
    assert result.returncode == 0, result.stderr


def test_docker_compose_rejects_an_unknown_service_key(tmp_path: Path, raw_compose: dict[str, Any]) -> None:
    unchanged = tmp_path / "unchanged.yml"
    unchanged.write_text(yaml.safe_dump(raw_compose), encoding="utf-8")
    assert compose_config(unchanged).returncode == 0, "the copy itself must be valid"
    mutated = yaml.safe_load(yaml.safe_dump(raw_compose))
    mutated["services"]["vllm"]["enable_lora"] = True
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump(mutated), encoding="utf-8")
    result = compose_config(broken)
    assert result.returncode != 0
    assert "enable_lora" in result.stderr
