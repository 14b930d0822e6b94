"""Assertions on rendered fields: what a user of the chart relies on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from chartlib import (
    CI_VALUES_DIR,
    FULLNAME,
    NAMESPACE,
    Rendered,
    case_name,
    ci_values_files,
    containers,
    env_of,
    mounts_of,
    pod_labels,
    pod_spec,
    render,
    render_notes,
    volumes_of,
)

from assayer.rq_internals import queue_key

pytestmark = pytest.mark.chart

CASES = ci_values_files()
CASE_IDS = [case_name(p) for p in CASES]
WATCH = f"{FULLNAME}-watch"
EVAL = f"{FULLNAME}-eval"
DASHBOARD = f"{FULLNAME}-dashboard"
REDIS = f"{FULLNAME}-redis"


def case(name: str) -> tuple[Path, ...]:
    return (CI_VALUES_DIR / f"{name}-values.yaml",)


def container(obj: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    found = [c for c in containers(obj) if name is None or c["name"] == name]
    assert len(found) == 1, [c["name"] for c in containers(obj)]
    return found[0]


# ---------------------------------------------------------------- commands and image


def test_workers_and_dashboard_run_the_assayer_subcommands(helm: str) -> None:
    r = render(helm)
    expected = {WATCH: ["worker", "watch"], EVAL: ["worker", "eval"], DASHBOARD: ["dashboard"]}
    for name, args in expected.items():
        c = container(r.get("Deployment", name))
        assert c["args"] == args
        assert "command" not in c, "the image's entrypoint (tini -- assayer) must run"
        assert c["image"] == "assayer:0.1.0"
        assert c["imagePullPolicy"] == "IfNotPresent"


def test_eval_image_override_and_digest(helm: str) -> None:
    gpu = render(helm, files=case("gpu"))
    assert container(gpu.get("Deployment", EVAL))["image"] == "assayer:0.1.0-cuda"
    assert container(gpu.get("Deployment", WATCH))["image"] == "assayer:0.1.0"
    digest = "sha256:" + "a" * 64
    pinned = render(helm, {"image": {"digest": digest}})
    assert container(pinned.get("Deployment", WATCH))["image"] == f"assayer@{digest}"


# ---------------------------------------------------------------- checkpoints and results


@pytest.mark.parametrize("values_file", CASES, ids=CASE_IDS)
def test_checkpoints_are_mounted_read_only_everywhere(helm: str, values_file: Path) -> None:
    r = render(helm, files=(values_file,))
    mounted_in = []
    for obj in r.workloads():
        volumes = volumes_of(obj)
        if "checkpoints" not in volumes:
            continue
        claim = volumes["checkpoints"].get("persistentVolumeClaim")
        if claim:
            assert claim["readOnly"] is True
        for c in containers(obj):
            m = mounts_of(c).get("checkpoints")
            if m:
                assert m["readOnly"] is True, f"{obj['metadata']['name']}/{c['name']} mounts checkpoints writable"
                assert m["mountPath"] == "/checkpoints"
                mounted_in.append(obj["metadata"]["name"])
    # the watch workers and the eval workers of every pool (helm/assayer/ci/pools-values.yaml has three)
    pools = [f"{EVAL}-{pool}" for pool in sorted(yaml.safe_load(values_file.read_text()).get("evalPools", {}))]
    assert sorted(mounted_in) == sorted([EVAL, *pools, WATCH])


def test_checkpoint_volume_choices(helm: str) -> None:
    default = render(helm)
    pvc = default.get("PersistentVolumeClaim", f"{FULLNAME}-checkpoints")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert (
        volumes_of(default.get("Deployment", EVAL))["checkpoints"]["persistentVolumeClaim"]["claimName"]
        == pvc["metadata"]["name"]
    )

    existing = render(helm, files=case("existing-claim"))
    assert existing.find("PersistentVolumeClaim", f"{FULLNAME}-checkpoints") is None
    assert existing.find("PersistentVolumeClaim", f"{FULLNAME}-results") is None
    for name in (WATCH, EVAL):
        obj = existing.get("Deployment", name)
        assert volumes_of(obj)["checkpoints"]["persistentVolumeClaim"]["claimName"] == "training-checkpoints"
        assert mounts_of(container(obj))["checkpoints"]["subPath"] == "runs"
    assert volumes_of(existing.get("Deployment", EVAL))["results"]["persistentVolumeClaim"]["claimName"] == ("assayer-results")

    host = render(helm, files=case("hostpath"))
    assert host.of_kind("PersistentVolumeClaim") == []
    for name in (WATCH, EVAL):
        vol = volumes_of(host.get("Deployment", name))["checkpoints"]
        assert vol["hostPath"] == {"path": "/data/checkpoints", "type": "DirectoryOrCreate"}

    rox = render(helm, {"checkpoints": {"persistence": {"accessMode": "ReadOnlyMany", "volumeName": "nfs-ckpt"}}})
    spec = rox.get("PersistentVolumeClaim", f"{FULLNAME}-checkpoints")["spec"]
    assert spec["accessModes"] == ["ReadOnlyMany"] and spec["volumeName"] == "nfs-ckpt"


def test_storage_class_conventions(helm: str) -> None:
    default = render(helm).get("PersistentVolumeClaim", f"{FULLNAME}-checkpoints")["spec"]
    assert "storageClassName" not in default
    named = render(helm, {"checkpoints": {"persistence": {"storageClass": "nfs"}}})
    assert named.get("PersistentVolumeClaim", f"{FULLNAME}-checkpoints")["spec"]["storageClassName"] == "nfs"
    static = render(helm, {"checkpoints": {"persistence": {"storageClass": "-"}}})
    assert static.get("PersistentVolumeClaim", f"{FULLNAME}-checkpoints")["spec"]["storageClassName"] == ""


def test_results_are_writable_only_by_eval_pods(helm: str) -> None:
    r = render(helm)
    assert r.config()["ASSAYER_RESULTS_DIR"] == "/results"
    eval_mounts = mounts_of(container(r.get("Deployment", EVAL)))
    assert eval_mounts["results"]["mountPath"] == "/results"
    assert not eval_mounts["results"].get("readOnly", False)
    assert "results" not in mounts_of(container(r.get("Deployment", WATCH)))
    assert r.get("PersistentVolumeClaim", f"{FULLNAME}-results")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_results_in_an_emptydir_come_with_a_warning(helm: str) -> None:
    r = render(helm, files=case("hostpath"))
    assert volumes_of(r.get("Deployment", EVAL))["results"] == {"name": "results", "emptyDir": {}}
    assert "WARNING" in render_notes(helm, files=case("hostpath"))
    assert "WARNING" not in render_notes(helm)


def test_home_and_tmp_are_writable_emptydirs(helm: str) -> None:
    """The root filesystem is read-only, so ASSAYER_HOME and /tmp must lie on writable volumes."""
    r = render(helm)
    home = r.config()["ASSAYER_HOME"]
    assert home == "/home/assayer/.assayer"
    for obj in r.workloads():
        c = containers(obj)[0]
        if not c["image"].startswith("assayer"):
            continue
        volumes = volumes_of(obj)
        for path in (home, "/tmp"):
            mount = max(
                (m for m in c["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")),
                key=lambda m: len(m["mountPath"]),
                default=None,
            )
            assert mount is not None, f"{obj['metadata']['name']}: nothing writable at {path}"
            assert "emptyDir" in volumes[mount["name"]]
            assert not mount.get("readOnly", False)


# ---------------------------------------------------------------- watches and evaluators


def test_watches_become_the_watch_workers_watches_file(helm: str) -> None:
    r = render(helm, files=case("gpu"))
    watches = yaml.safe_load(r.get("ConfigMap", f"{FULLNAME}-watches")["data"]["watches.yaml"])
    assert watches == {
        "watches": [
            {
                "name": "digits",
                "directory": "/checkpoints/digits",
                "evaluator": "/evaluators/digits_eval.py:evaluate",
                "regex": r"\.pt$",
                "eval_existing": True,
            }
        ]
    }
    watch = r.get("Deployment", WATCH)
    c = container(watch)
    path = Path(env_of(c)["ASSAYER_WATCHES_FILE"]["value"])
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(path.parent))
    assert mount["readOnly"] is True
    assert volumes_of(watch)[mount["name"]]["configMap"]["name"] == f"{FULLNAME}-watches"
    assert path.name == "watches.yaml"


def test_directory_layouts_reach_the_watches_file_and_assayer_reads_them(helm: str, tmp_path: Path) -> None:
    from assayer.watches import load_file

    watch = {"name": "llm", "directory": "llm", "evaluator": "/evaluators/lm.py:evaluate", "layout": "marker",
             "ready_markers": ["COMMITTED"]}
    r = render(helm, {"watches": [watch]})
    text = r.get("ConfigMap", f"{FULLNAME}-watches")["data"]["watches.yaml"]
    (tmp_path / "watches.yaml").write_text(text)
    assert load_file(tmp_path / "watches.yaml") == [{**watch, "directory": "/checkpoints/llm"}]


def test_absolute_watch_directories_are_kept(helm: str) -> None:
    r = render(helm, files=case("existing-claim"))
    watches = yaml.safe_load(r.get("ConfigMap", f"{FULLNAME}-watches")["data"]["watches.yaml"])["watches"]
    assert watches == [{"name": "llm", "directory": "/checkpoints/llm", "evaluator": "/evaluators/harness.py:evaluate"}]


def test_evaluator_code_sources(helm: str) -> None:
    image = render(helm)
    for name in (WATCH, EVAL):
        obj = image.get("Deployment", name)
        assert "evaluators" not in volumes_of(obj)
        assert "PYTHONPATH" not in env_of(container(obj))

    inline = render(helm, files=case("gpu"))
    cm = inline.get("ConfigMap", f"{FULLNAME}-evaluators")
    assert "def evaluate(path):" in cm["data"]["digits_eval.py"]
    existing = render(helm, files=case("existing-claim"))
    pvc = render(helm, {"evaluators": {"volume": {"persistentVolumeClaim": {"claimName": "evals"}}}})
    for r, source in (
        (inline, {"configMap": {"name": f"{FULLNAME}-evaluators"}}),
        (existing, {"configMap": {"name": "my-evaluators"}}),
        (pvc, {"persistentVolumeClaim": {"claimName": "evals"}}),
    ):
        obj = r.get("Deployment", EVAL)
        assert volumes_of(obj)["evaluators"] == {"name": "evaluators", **source}
        c = container(obj)
        assert mounts_of(c)["evaluators"] == {"name": "evaluators", "mountPath": "/evaluators", "readOnly": True}
        assert env_of(c)["PYTHONPATH"]["value"] == "/evaluators"


# ---------------------------------------------------------------- settings parity with the CLI and compose


def test_config_map_carries_the_contract_defaults(helm: str) -> None:
    from assayer import defaults  # the core package's defaults: the chart must not drift from them

    cfg = render(helm).config()
    assert cfg["ASSAYER_WATCH_QUEUE"] == defaults.WATCH_QUEUE
    assert cfg["ASSAYER_EVAL_QUEUE"] == defaults.EVAL_QUEUE
    assert float(cfg["ASSAYER_POLL_INTERVAL"]) == defaults.POLL_INTERVAL
    assert float(cfg["ASSAYER_SETTLE"]) == defaults.SETTLE
    assert float(cfg["ASSAYER_EVAL_TIMEOUT"]) == defaults.EVAL_TIMEOUT
    assert int(cfg["ASSAYER_RETRIES"]) == defaults.RETRIES
    assert tuple(int(x) for x in cfg["ASSAYER_RETRY_BACKOFF"].split(",")) == defaults.RETRY_BACKOFF
    assert int(cfg["ASSAYER_LEASE_TTL"]) == defaults.LEASE_TTL
    assert int(cfg["ASSAYER_MAX_WARM_EVALUATORS"]) == defaults.MAX_WARM_EVALUATORS
    assert float(cfg["ASSAYER_HEARTBEAT_INTERVAL"]) == defaults.HEARTBEAT_INTERVAL
    assert float(cfg["ASSAYER_REAP_INTERVAL"]) == defaults.REAP_INTERVAL
    assert float(cfg["ASSAYER_FULL_SCAN_INTERVAL"]) == defaults.FULL_SCAN_INTERVAL
    assert cfg["ASSAYER_LOG_LEVEL"] == "INFO"
    assert all(k.startswith("ASSAYER_") for k in cfg)


def test_config_values_parse_as_the_settings_object_expects(helm: str) -> None:
    from assayer.settings import Settings

    r = render(
        helm,
        {
            "config": {"pollInterval": 0.5, "evalTimeout": 7200, "retryBackoff": "5,30,120"},
            "eval": {"terminationGracePeriodSeconds": 7300},
        },
    )
    settings = Settings.from_env(r.config())
    assert settings.poll_interval == 0.5
    assert settings.eval_timeout == 7200
    assert settings.retry_backoff == (5, 30, 120)


def test_every_assayer_pod_loads_the_config_map(helm: str) -> None:
    r = render(helm)
    for obj in r.workloads():
        for c in containers(obj):
            if c["image"].startswith("assayer"):
                refs = [e["configMapRef"]["name"] for e in c.get("envFrom", [])]
                assert refs == [f"{FULLNAME}-config"], obj["metadata"]["name"]


def test_service_links_cannot_shadow_assayer_settings(helm: str) -> None:
    """A Service named assayer-dashboard would inject ASSAYER_DASHBOARD_PORT=tcp://... into pods."""
    for obj in render(helm).workloads():
        assert pod_spec(obj)["enableServiceLinks"] is False, obj["metadata"]["name"]


def test_checksums_roll_pods_when_config_changes(helm: str) -> None:
    def annotations(r: Rendered, name: str) -> dict[str, str]:
        found: dict[str, str] = r.get("Deployment", name)["spec"]["template"]["metadata"]["annotations"]
        return found

    base = render(helm)
    queue = render(helm, {"config": {"evalQueue": "other"}})
    watches = render(helm, files=case("hostpath"))
    for name in (WATCH, EVAL):
        assert annotations(base, name)["checksum/config"] != annotations(queue, name)["checksum/config"]
        assert annotations(base, name)["checksum/watches"] == annotations(queue, name)["checksum/watches"]
        assert annotations(base, name)["checksum/watches"] != annotations(watches, name)["checksum/watches"]


# ---------------------------------------------------------------- GPU


def test_gpus_only_when_asked(helm: str) -> None:
    for r in (render(helm), render(helm, files=case("keda"))):
        assert "nvidia.com/gpu" not in r.text
        assert "runtimeClassName" not in pod_spec(r.get("Deployment", EVAL))

    r = render(helm, files=case("gpu"))
    ev = r.get("Deployment", EVAL)
    c = container(ev)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["resources"]["limits"]["memory"] == "8Gi", "GPU limits are added to, not instead of, the others"
    spec = pod_spec(ev)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true", "pool": "eval"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "eval", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["runtimeClassName"] == "nvidia"
    assert volumes_of(ev)["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert mounts_of(c)["shm"]["mountPath"] == "/dev/shm"
    for name in (WATCH, DASHBOARD):
        assert "nvidia.com/gpu" not in str(r.get("Deployment", name))


# ---------------------------------------------------------------- autoscaling


def test_keda_scales_on_the_lists_the_eval_workers_pop(helm: str) -> None:
    r = render(helm, files=case("keda"))
    assert r.config()["ASSAYER_EVAL_QUEUE"] == "lm-evals"
    scaled = r.get("ScaledObject", EVAL)
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": EVAL}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 8)
    # The default pool's workers pop its queue, then its backfill queue: both count, so re-evaluations
    # of older checkpoints wake the workers too. rq keeps queue <name> in the Redis list rq:queue:<name>.
    queue = r.config()["ASSAYER_EVAL_QUEUE"]
    triggers = scaled["spec"]["triggers"]
    assert [(t["name"], t["metadata"]["listName"]) for t in triggers] == [
        ("queue", queue_key(queue)),
        ("backfill", queue_key(f"{queue}-backfill")),
    ]
    assert env_of(container(r.get("Deployment", EVAL)))["ASSAYER_POOLS"]["value"] == "default"
    for trigger in triggers:
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listLength"] == "2"
        assert trigger["metadata"]["address"] == f"{REDIS}.{NAMESPACE}.svc.cluster.local:6379"
        assert trigger["metadata"]["databaseIndex"] == "0"
        assert trigger["metadata"]["enableTLS"] == "false"
        assert trigger["authenticationRef"] == triggers[0]["authenticationRef"]
    trigger = triggers[0]
    # The in-chart URL the workers use points at the same Service and database.
    assert env_of(container(r.get("Deployment", EVAL)))["ASSAYER_REDIS_URL"]["value"] == f"redis://{REDIS}:6379/0"

    auth = r.get("TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "password"
    worker_password = env_of(container(r.get("Deployment", EVAL)))["ASSAYER_REDIS_PASSWORD"]["valueFrom"]
    assert {"name": ref["name"], "key": ref["key"]} == worker_password["secretKeyRef"]
    assert ref["key"] in r.get("Secret", ref["name"])["data"]


def test_no_replicas_field_when_an_autoscaler_owns_the_count(helm: str) -> None:
    assert render(helm).get("Deployment", EVAL)["spec"]["replicas"] == 1
    assert render(helm, files=case("existing-claim")).get("Deployment", EVAL)["spec"]["replicas"] == 3
    keda = render(helm, files=case("keda"))
    assert "replicas" not in keda.get("Deployment", EVAL)["spec"]
    assert keda.of_kind("HorizontalPodAutoscaler") == []
    hpa = render(helm, files=case("ingress"))
    assert "replicas" not in hpa.get("Deployment", EVAL)["spec"]
    assert hpa.of_kind("ScaledObject") == []
    spec = hpa.get("HorizontalPodAutoscaler", EVAL)["spec"]
    assert spec["scaleTargetRef"]["name"] == EVAL and spec["maxReplicas"] == 6
    # the watch workers keep their count whatever scales the eval workers
    assert keda.get("Deployment", WATCH)["spec"]["replicas"] == 1


def test_keda_reaches_an_external_redis_as_the_workers_do(helm: str) -> None:
    r = render(helm, files=case("external-redis"))
    assert r.of_kind("StatefulSet") == []
    trigger = r.get("ScaledObject", EVAL)["spec"]["triggers"][0]["metadata"]
    assert trigger["address"] == "redis.data.svc.cluster.local:6380"
    assert trigger["databaseIndex"] == "3"
    assert trigger["enableTLS"] == "true"
    secret = f"{FULLNAME}-external-redis"
    assert r.secret_value(secret, "redis-url") == "rediss://redis.data.svc.cluster.local:6380/3"
    env = env_of(container(r.get("Deployment", EVAL)))
    assert env["ASSAYER_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "redis-url"}
    assert env["ASSAYER_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "redis-password"}


def test_keda_operator_may_reach_redis_only_when_keda_is_on(helm: str) -> None:
    def peers(r: Rendered) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = r.get("NetworkPolicy", REDIS)["spec"]["ingress"][0]["from"]
        return found

    assert len(peers(render(helm))) == 1
    keda_peers = peers(render(helm, files=case("keda")))
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
        "podSelector": {"matchLabels": {"app": "keda-operator"}},
    } in keda_peers


# ---------------------------------------------------------------- secrets


SENTINELS = {
    "redis": "redis-sentinel-Q7x",
    "dashboard": "dash-sentinel-W3z",
    "external": "external-sentinel-password",
}


@pytest.mark.parametrize("values_file", CASES, ids=CASE_IDS)
def test_secrets_come_from_secret_refs_only(helm: str, values_file: Path) -> None:
    r = render(helm, files=(values_file,))
    for obj in r.workloads():
        for c in containers(obj):
            for name, e in env_of(c).items():
                if "PASSWORD" in name or name in ("REDISCLI_AUTH",):
                    assert "value" not in e, f"{obj['metadata']['name']}: {name} is inline"
                    assert "secretKeyRef" in e["valueFrom"]
                if name == "ASSAYER_REDIS_URL" and "value" in e:
                    assert "@" not in e["value"], "credentials in a URL value"
    for cm in r.of_kind("ConfigMap"):
        assert not any("PASSWORD" in k for k in cm.get("data", {})), cm["metadata"]["name"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"redis": {"auth": {"password": SENTINELS["redis"]}}, "dashboard": {"auth": {"password": SENTINELS["dashboard"]}}},
        {
            "redis": {"enabled": False},
            "externalRedis": {"url": "redis://r.example:6379/0", "password": SENTINELS["external"]},
            "dashboard": {"auth": {"password": SENTINELS["dashboard"]}},
        },
    ],
    ids=["in-chart", "external"],
)
def test_passwords_appear_only_in_secrets(helm: str, overrides: dict[str, Any]) -> None:
    r = render(helm, overrides, {"eval": {"keda": {"enabled": True}}})
    in_secrets = set()
    for obj in r.docs:
        if obj["kind"] == "Secret":
            in_secrets |= {r.secret_value(obj["metadata"]["name"], k) for k in obj["data"]}
            continue
        for s in SENTINELS.values():
            assert s not in str(obj), f"{s} appears in {obj['kind']}/{obj['metadata']['name']}"
    assert {s for s in SENTINELS.values() if s in str(overrides)} <= in_secrets


def test_generated_passwords_are_strong_and_existing_secrets_are_used(helm: str) -> None:
    r = render(helm)
    for secret, key, length in ((REDIS, "redis-password", 32), (DASHBOARD, "password", 24)):
        value = r.secret_value(secret, key)
        assert len(value) == length and value.isalnum()
    other = render(helm, {"redis": {"auth": {"existingSecret": "corp-redis", "existingSecretPasswordKey": "pw"}}})
    assert other.find("Secret", REDIS) is None
    ref = env_of(container(other.get("Deployment", EVAL)))["ASSAYER_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "corp-redis", "key": "pw"}
    redis_env = env_of(container(other.get("StatefulSet", REDIS)))
    assert redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref


# ---------------------------------------------------------------- probes and hardening


@pytest.mark.parametrize("values_file", CASES, ids=CASE_IDS)
def test_long_running_containers_have_probes(helm: str, values_file: Path) -> None:
    r = render(helm, files=(values_file,))
    for obj in r.of_kind("Deployment") + r.of_kind("StatefulSet"):
        for c in containers(obj):
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert probe in c, f"{obj['metadata']['name']}/{c['name']} has no {probe}"


def test_worker_probes_ask_the_worker_itself(helm: str) -> None:
    r = render(helm)
    for name, role in ((WATCH, "watch"), (EVAL, "eval")):
        c = container(r.get("Deployment", name))
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["exec"]["command"] == ["assayer", "health", role]
    dash = container(r.get("Deployment", DASHBOARD))
    assert dash["livenessProbe"]["tcpSocket"]["port"] == "http"
    redis = container(r.get("StatefulSet", REDIS))
    assert "redis-cli" in " ".join(redis["livenessProbe"]["exec"]["command"])
    assert "REDISCLI_AUTH" in env_of(redis)


@pytest.mark.parametrize("values_file", CASES, ids=CASE_IDS)
def test_every_pod_is_hardened(helm: str, values_file: Path) -> None:
    r = render(helm, files=(values_file,))
    for obj in r.workloads():
        name = obj["metadata"]["name"]
        spec = pod_spec(obj)
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, name
        assert psc["runAsUser"] != 0, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for k in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(k), name
        for c in containers(obj):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in sc["capabilities"], name
            assert sc.get("privileged", False) is False, name
            assert "limits" in c["resources"] and "requests" in c["resources"], name


def test_service_account_has_no_token(helm: str) -> None:
    r = render(helm)
    (sa,) = r.of_kind("ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    for obj in r.workloads():
        assert pod_spec(obj)["serviceAccountName"] == sa["metadata"]["name"]


def test_warm_shutdown_grace_periods(helm: str) -> None:
    r = render(helm)
    assert pod_spec(r.get("Deployment", EVAL))["terminationGracePeriodSeconds"] == 3600
    assert pod_spec(r.get("Deployment", WATCH))["terminationGracePeriodSeconds"] == 60


# ---------------------------------------------------------------- Redis


def test_redis_runs_the_official_image_with_aof_and_no_inline_password(helm: str) -> None:
    r = render(helm, {"redis": {"auth": {"password": SENTINELS["redis"]}}})
    sts = r.get("StatefulSet", REDIS)
    c = container(sts)
    assert c["image"] == "redis:7.2"
    conf = r.get("ConfigMap", REDIS)["data"]["redis.conf"]
    assert "appendonly yes" in conf.splitlines()
    assert "maxmemory-policy noeviction" in conf.splitlines()
    assert SENTINELS["redis"] not in str(sts)
    assert "requirepass" in " ".join(c["command"]) and "$REDIS_PASSWORD" in " ".join(c["command"])
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/data", "/tmp"}
    svc = r.get("Service", REDIS)
    assert svc["spec"]["ports"][0]["port"] == 6379 and svc["spec"]["type"] == "ClusterIP"


def test_only_assayer_pods_reach_redis(helm: str) -> None:
    r = render(helm)
    policy = r.get("NetworkPolicy", REDIS)["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    selector = peer["podSelector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "assayer", "app.kubernetes.io/instance": "assayer"}
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    # every pod that talks to Redis carries the labels the policy admits
    for obj in r.workloads():
        if "ASSAYER_REDIS_URL" in str(obj):
            labels = pod_labels(obj)
            assert all(labels.get(k) == v for k, v in selector.items()), obj["metadata"]["name"]


@pytest.mark.parametrize("values_file", CASES, ids=CASE_IDS)
def test_every_pod_is_covered_by_a_network_policy(helm: str, values_file: Path) -> None:
    r = render(helm, files=(values_file,))
    policies = [p["spec"]["podSelector"] for p in r.of_kind("NetworkPolicy")]

    def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
            return False
        return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))

    for obj in r.workloads():
        assert any(selects(s, pod_labels(obj)) for s in policies), obj["metadata"]["name"]


# ---------------------------------------------------------------- dashboard


def test_dashboard_defaults(helm: str) -> None:
    r = render(helm)
    env = env_of(container(r.get("Deployment", DASHBOARD)))
    assert env["ASSAYER_DASHBOARD_ALLOW_ACTIONS"]["value"] == "false"
    assert "ASSAYER_DASHBOARD_ALLOW_DELETE" not in env
    assert env["ASSAYER_DASHBOARD_BIND"]["value"] == "0.0.0.0"
    assert env["ASSAYER_DASHBOARD_PORT"]["value"] == "9181"
    assert env["ASSAYER_DASHBOARD_USER"]["value"] == "assayer"
    assert env["ASSAYER_DASHBOARD_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": DASHBOARD, "key": "password"}
    svc = r.get("Service", DASHBOARD)["spec"]
    assert svc["type"] == "ClusterIP" and svc["ports"][0]["port"] == 9181
    assert r.of_kind("Ingress") == []
    notes = render_notes(helm)
    assert f"port-forward svc/{DASHBOARD} 9181:9181" in notes
    assert f"get secret {DASHBOARD} -o jsonpath='{{.data.password}}'" in notes


def test_dashboard_ingress_and_existing_secret(helm: str) -> None:
    r = render(helm, files=case("ingress"))
    assert r.find("Secret", DASHBOARD) is None
    env = env_of(container(r.get("Deployment", DASHBOARD)))
    assert env["ASSAYER_DASHBOARD_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "assayer-dashboard-auth", "key": "pw"}
    ing = r.get("Ingress", DASHBOARD)["spec"]
    assert ing["ingressClassName"] == "nginx"
    assert ing["tls"] == [{"hosts": ["assayer.internal.example.org"], "secretName": f"{DASHBOARD}-tls"}]
    backend = ing["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": DASHBOARD, "port": {"name": "http"}}
    assert env["ASSAYER_DASHBOARD_ALLOW_ACTIONS"]["value"] == "true"
    notes = render_notes(helm, files=case("ingress"))
    assert "https://assayer.internal.example.org/" in notes
    assert "actions are ENABLED" in notes and "WARNING" not in notes
    assert "get secret assayer-dashboard-auth -o jsonpath='{.data.pw}'" in notes


def dashboard_sources(r: Rendered) -> list[dict[str, Any]]:
    """The peers the dashboard's NetworkPolicy admits, on its http port only."""
    spec = r.get("NetworkPolicy", DASHBOARD)["spec"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "dashboard"
    assert spec["policyTypes"] == ["Ingress"]
    if not spec["ingress"]:
        return []
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    return list(rule["from"])


RELEASE_PODS = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "assayer", "app.kubernetes.io/instance": "assayer"}}}
INGRESS_NGINX = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}}


def test_dashboard_network_policy_admits_only_the_named_sources(helm: str) -> None:
    assert dashboard_sources(render(helm)) == [RELEASE_PODS]  # no Ingress: no controller, and never "from anyone"
    assert dashboard_sources(render(helm, {"dashboard": {"ingress": {"enabled": True}}})) == [RELEASE_PODS, INGRESS_NGINX]
    assert dashboard_sources(render(helm, files=case("ingress"))) == [INGRESS_NGINX, {"ipBlock": {"cidr": "10.8.0.0/16"}}]
    traefik = {"namespace": "kube-system", "podLabels": {"app.kubernetes.io/name": "traefik"}}
    r = render(helm, {"dashboard": {"ingress": {"enabled": True}},
                      "networkPolicy": {"dashboard": {"fromReleasePods": False, "ingressController": traefik}}})
    assert dashboard_sources(r) == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                                     "podSelector": {"matchLabels": {"app.kubernetes.io/name": "traefik"}}}]
    assert dashboard_sources(render(helm, {"networkPolicy": {"dashboard": {"fromReleasePods": False}}})) == []


def test_dashboard_actions_and_the_deprecated_allow_delete(helm: str) -> None:
    for values in ({"dashboard": {"allowActions": True}}, {"dashboard": {"allowDelete": True}}):
        env = env_of(container(render(helm, values).get("Deployment", DASHBOARD)))
        assert env["ASSAYER_DASHBOARD_ALLOW_ACTIONS"]["value"] == "true", values
        assert "actions are ENABLED" in render_notes(helm, values)
    assert "dashboard.allowDelete is deprecated" in render_notes(helm, {"dashboard": {"allowDelete": True}})
    assert "ENABLED" not in render_notes(helm)


def test_an_ingress_without_tls_is_warned_about(helm: str) -> None:
    notes = render_notes(helm, {"dashboard": {"ingress": {"enabled": True}}})
    assert "http://assayer.example.com/" in notes
    assert "WARNING: the dashboard's Ingress has no TLS" in notes


def test_dashboard_can_be_left_out(helm: str) -> None:
    r = render(helm, {"dashboard": {"enabled": False}})
    assert not [n for n in r.names() if "dashboard" in n]
    assert "Dashboard" not in render_notes(helm, {"dashboard": {"enabled": False}})


# ---------------------------------------------------------------- helm test


def test_helm_test_hooks_check_redis_and_status(helm: str) -> None:
    for values in ({}, {"redis": {"enabled": False}, "externalRedis": {"existingSecret": "x", "existingSecretPasswordKey": "p"}}):
        r = render(helm, values)
        pods = {p["metadata"]["name"]: p for p in r.of_kind("Pod")}
        assert set(pods) == {f"{FULLNAME}-test-redis", f"{FULLNAME}-test-status"}
        for pod in pods.values():
            assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
            assert pod["spec"]["restartPolicy"] == "Never"
        ping = container(pods[f"{FULLNAME}-test-redis"])
        script = ping["command"][-1]
        assert 'redis-cli -u "$ASSAYER_REDIS_URL" ping' in script and "= PONG" in script
        assert "REDISCLI_AUTH" in env_of(ping) and "ASSAYER_REDIS_URL" in env_of(ping)
        assert container(pods[f"{FULLNAME}-test-status"])["args"] == ["status"]
    assert render(helm, {"tests": {"enabled": False}}).of_kind("Pod") == []


# ---------------------------------------------------------------- labels


def test_app_kubernetes_io_labels_everywhere(helm: str) -> None:
    r = render(helm, files=case("keda"))
    for obj in r.docs:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "assayer"
        assert labels["app.kubernetes.io/instance"] == "assayer"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert obj["metadata"]["namespace"] == NAMESPACE
