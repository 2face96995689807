"""docker-compose.yml and the Dockerfile agree with the code; the README lists every setting.

No Docker engine runs in the tests: the compose file is parsed and checked against the
project itself. The environment variables "the code reads" are found by scanning the
sources (``meter/``, ``worker/``), not kept in a list here, so a variable added to the
code and forgotten in the README (or a typo in the compose file) fails a test.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from meter.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
SOURCES = ("meter", "worker")

# os.environ["X"], os.environ.get("X"), os.getenv("X"), env.get("X"), click's envvar="X",
# and any METER_* name spelled out (constants such as BROKER_URL_ENV = "METER_BROKER_URL").
_READ = re.compile(
    r"""(?:environ\s*(?:\.get\(|\[)|getenv\(|\benv\.get\(|_number\(\s*env,|envvar=)\s*["']([A-Z][A-Z0-9_]+)["']"""
)
_METER_NAME = re.compile(r"\bMETER_[A-Z0-9_]*[A-Z0-9]\b")


def env_vars_read() -> set[str]:
    """Every environment variable name the project's code reads or names."""
    found: set[str] = set()
    for package in SOURCES:
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            found.update(_READ.findall(text))
            found.update(_METER_NAME.findall(text))
    return found


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def project_services() -> dict[str, dict[str, Any]]:
    """The services that run the project's own image (built from the Dockerfile)."""
    return {name: s for name, s in compose()["services"].items() if "build" in s}


def test_scan_finds_the_variables_we_know_of() -> None:
    # guards the scanner itself: if these went missing, the checks below would be empty
    assert {"METER_DATABASE_URL", "METER_BROKER_URL", "METER_METRICS_PORT", "METER_HOME"} <= (
        env_vars_read()
    )


def test_compose_has_the_services_of_the_spec() -> None:
    services = compose()["services"]
    assert set(services) >= {"postgres", "redis", "migrate", "worker", "beat", "flower"}
    assert set(project_services()) == {"migrate", "worker", "beat", "flower"}
    assert services["postgres"]["image"].startswith("postgres:18")


def test_redis_is_persistent_and_never_evicts() -> None:
    redis = compose()["services"]["redis"]
    command = [str(c) for c in redis["command"]]
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=False))
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    # Redis's own cut of a torn AOF can lose later writes (docs/reliability.md)
    assert options["--aof-load-truncated"] == "no"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    # the transport needs Redis >= 6.2 (BLMOVE)
    major, minor = (int(x) for x in redis["image"].split(":")[1].split(".")[:2])
    assert (major, minor) >= (6, 2)


@pytest.mark.parametrize("name", ["migrate", "worker", "beat", "flower"])
def test_every_command_names_an_entrypoint_of_the_project(name: str) -> None:
    command = [str(c) for c in project_services()[name]["command"]]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    if command[0] == "meter":
        assert "meter" in scripts
        assert command[1] in cli_main.commands, f"meter has no command {command[1]!r}"
        return
    assert command[0] == "celery", command
    app = command[command.index("-A") + 1]
    assert importlib.util.find_spec(app) is not None, f"no module {app!r}"
    assert importlib.import_module(app).app.main == "meter"
    sub = command[command.index("-A") + 2]
    assert sub in {"worker", "beat", "flower"}, sub
    if sub == "flower":  # not a dependency of the package: the image must install it
        assert re.search(r"pip install .*flower", DOCKERFILE.read_text())


def test_every_variable_the_compose_file_sets_is_one_the_code_reads() -> None:
    read = env_vars_read()
    for name, service in project_services().items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use the mapping form for environment"
        unknown = set(env) - read
        assert not unknown, f"{name} sets variables the code never reads: {sorted(unknown)}"
        if name != "migrate":
            assert {"METER_DATABASE_URL", "METER_BROKER_URL"} <= set(env), name
    assert "METER_DATABASE_URL" in project_services()["migrate"]["environment"]


def test_workers_scale_and_beat_runs_once() -> None:
    services = compose()["services"]
    worker, beat, migrate = services["worker"], services["beat"], services["migrate"]
    # --scale worker=N: no fixed container name, no host port that N copies would share
    assert "container_name" not in worker and "ports" not in worker
    assert "deploy" not in beat  # no replicas: one beat
    # the migration runs once and the pipeline waits for it to succeed
    assert migrate["restart"] == "no"
    for service in (worker, beat):
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["environment"]["METER_METRICS_PORT"] in [str(p) for p in worker["expose"]]


def test_dockerfile_builds_what_the_services_run() -> None:
    text = DOCKERFILE.read_text()
    copied = " ".join(re.findall(r"^COPY (.+)$", text, flags=re.M))
    for needed in ("pyproject.toml", "meter", "worker", "sql"):
        assert needed in copied, f"the Dockerfile does not copy {needed}"
    assert re.search(r"^RUN pip install \.", text, flags=re.M)
    # the wheel carries sql/ (meter.migrate looks for meter/sql when installed)
    wheel = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    assert wheel["targets"]["wheel"]["force-include"]["sql"] == "meter/sql"


def test_every_meter_variable_is_documented_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Configuration", 1)
    assert len(section) == 2, "README has no Configuration section"
    table = section[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(METER_[A-Z0-9_]+)`", table, flags=re.M))
    missing = {n for n in env_vars_read() if n.startswith("METER_")} - documented
    assert not missing, f"README Configuration table lacks {sorted(missing)}"
