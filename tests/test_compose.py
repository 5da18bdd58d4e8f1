"""The docker-compose deployment and the runner's Dockerfile, checked without a Docker engine: the
compose file against the compose-spec schema, then what it must say (only the UI published, on
localhost; the runner built from the Dockerfile; one data volume; an optional GPU runner), and the
Dockerfile's install order (torch first, everything through constraints.txt)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def pins() -> dict[str, str]:
    """name -> version of every `name==version` line of constraints.txt."""
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if m := re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#;]+)", line):
            found[m.group(1).lower()] = m.group(2)
    return found


def named_volumes(services) -> set[str]:
    volumes = [v for svc in services.values() for v in svc.get("volumes", [])]
    return {v.split(":")[0] for v in volumes if not v.startswith((".", "/"))}


def runners(services) -> dict:
    return {name: svc for name, svc in services.items() if name.startswith("runner")}


def check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=60)


def test_compose_file_follows_the_compose_spec(tmp_path):
    done = check_jsonschema(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "docker-compose.yml"  # the validator does reject a wrong file
    broken.write_text(COMPOSE.read_text().replace("  postgres:\n    image:", "  postgres:\n    imag:", 1))
    assert check_jsonschema(broken).returncode != 0


def test_only_the_ui_is_published_on_localhost(services):
    published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
    assert published == {"prefect-server": ["127.0.0.1:4200:4200"]}
    assert not any(svc.get("network_mode") == "host" for svc in services.values())


def test_prefect_server_runs_on_postgres(services):
    postgres, server = services["postgres"], services["prefect-server"]
    assert postgres["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    named = named_volumes(services)
    assert any(v.split(":")[0] in named for v in postgres["volumes"]), "the database on a named volume"

    env = server["environment"]
    url = env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4200/api", "the browser reaches the API where it is published"
    command = " ".join(server["command"]) if isinstance(server["command"], list) else server["command"]
    assert command.startswith("prefect server start") and "--host 0.0.0.0" in command
    assert "/api/health" in " ".join(server["healthcheck"]["test"])
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    image, _, tag = server["image"].partition(":")
    assert image == "prefecthq/prefect" and tag.split("-")[0] == pins()["prefect"], \
        "the server's Prefect is the runner's (constraints.txt)"


def test_runner_is_built_from_the_dockerfile_and_serves_kiln(services):
    assert set(runners(services)) == {"runner", "runner-gpu"}
    for name, svc in runners(services).items():
        build = svc["build"]
        assert build["context"] == "." and build.get("dockerfile", "Dockerfile") == "Dockerfile", name
        assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
        assert svc["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api", name
        assert svc["command"][:2] == ["kiln", "serve"] and "/data" in svc["command"], name
        assert svc["depends_on"]["prefect-server"]["condition"] == "service_healthy", name
        assert not svc.get("ports"), name
    assert services["runner"]["image"] != services["runner-gpu"]["image"], "a CUDA build must not replace the CPU one"


def test_the_data_volume_is_shared(compose, services):
    mounts = {name: [v for v in svc["volumes"] if v.endswith(":/data")] for name, svc in runners(services).items()}
    assert all(len(m) == 1 for m in mounts.values()), mounts
    sources = {m[0].split(":")[0] for m in mounts.values()}
    assert len(sources) == 1, f"every runner mounts the same data volume at /data: {mounts}"
    assert sources <= set(compose["volumes"]), "a named (top-level) volume, not a bind mount"


def test_gpu_reservation_is_optional(services):
    gpu = services["runner-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["profiles"] == ["gpu"], "started only on request, so CPU-only hosts still come up"
    assert "TORCH_INDEX_URL" in gpu["build"]["args"] and "cu" in gpu["build"]["args"]["TORCH_INDEX_URL"]
    default = [name for name, svc in services.items() if not svc.get("profiles")]
    assert sorted(default) == ["postgres", "prefect-server", "runner"]
    assert not services["runner"].get("deploy"), "the default runner needs no GPU"


@pytest.mark.skipif(not shutil.which("docker"), reason="no docker client")
def test_docker_compose_config_accepts_it():
    """Where the compose plugin is installed, its own parser too (no engine needed)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
        pytest.skip("the docker client has no compose plugin")
    for profile in ([], ["--profile", "gpu"]):
        done = subprocess.run(["docker", "compose", "-f", str(COMPOSE), *profile, "config", "--quiet"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.strip().startswith("#") and not current:
            continue
        current += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                lines.append((word.upper(), " ".join(rest.split())))
            current = ""
    return lines


def test_dockerfile_installs_torch_first_and_everything_through_constraints():
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    installs = [(i, args) for i, (word, args) in enumerate(steps) if word == "RUN" and "pip install" in args]
    assert len(installs) == 2, installs
    (torch_at, torch_step), (project_at, project_step) = installs
    assert f"torch=={pins()['torch']}" in torch_step and "-e ." not in torch_step, "torch alone, at the pinned version"
    assert "--index-url" in torch_step and "TORCH_INDEX_URL" in torch_step
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in steps[:torch_at], "CPU wheels by default"
    assert "pip install -e ." in project_step and torch_at < project_at
    assert all("-c constraints.txt" in step for _, step in installs)
    copied = [i for i, (word, args) in enumerate(steps) if word == "COPY" and "constraints.txt" in args.split()]
    assert copied and copied[0] < torch_at


def test_dockerfile_runs_kiln_serve_as_a_user_on_the_data_volume():
    steps = dockerfile_instructions()
    final = {word: args for word, args in steps}  # the last of each instruction wins
    assert final["USER"] not in ("root", "0") and final["USER"].split(":")[0] not in ("root", "0")
    assert final["WORKDIR"] == "/app"
    assert "KILN_DATA=/data" in " ".join(args for word, args in steps if word == "ENV")
    assert final["CMD"] == '["kiln", "serve", "--data-dir", "/data", "--refresh-input", "/data/crawl"]'
    for package in ("flows", "pipelines", "model", "storage", "configs"):
        assert any(word == "COPY" and args.split()[0].rstrip("/") == package for word, args in steps), package


def test_a_ray_cluster_is_a_profile_on_the_data_volume(services):
    ray = {name: svc for name, svc in services.items() if name.startswith("ray-")}
    assert set(ray) == {"ray-head", "ray-worker"}
    for name, svc in ray.items():
        assert svc["profiles"] == ["ray"], f"{name}: started only with --profile ray"
        assert svc["image"] == services["runner"]["image"], f"{name}: Kiln's image (its Ray, its code)"
        assert "kiln-data:/data" in svc["volumes"], f"{name}: the units write to the shared store"
        assert not svc.get("ports"), name
        assert svc["environment"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert "ray start --head --port=6379" in " ".join(ray["ray-head"]["command"])
    assert "--address=ray-head:6379" in " ".join(ray["ray-worker"]["command"])
