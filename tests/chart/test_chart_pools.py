"""Eval pools: one Deployment per pool, each serving its pool only, scaled on its own queues.

The contract with Assayer: pool P's new work is in the rq queue <ASSAYER_EVAL_QUEUE>-P (the default
pool's in ASSAYER_EVAL_QUEUE itself), its backfill in that name with -backfill; a worker serves the
pools in ASSAYER_POOLS."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from chartlib import (
    CHART,
    CI_VALUES_DIR,
    FULLNAME,
    KEDA_API,
    containers,
    env_of,
    mounts_of,
    pod_labels,
    pod_spec,
    render,
    render_error,
    render_notes,
    volumes_of,
)

from assayer.rq_internals import queue_key

pytestmark = pytest.mark.chart

POOLS_CASE = (CI_VALUES_DIR / "pools-values.yaml",)
EVAL = f"{FULLNAME}-eval"
GPU = f"{FULLNAME}-eval-gpu"
CPU_LARGE = f"{FULLNAME}-eval-cpu-large"
POOL_RE = r"^[a-z0-9]([a-z0-9-]{0,28}[a-z0-9])?$"  # assayer/pools.py's POOL_RE, anchored


def eval_container(obj: dict[str, Any]) -> dict[str, Any]:
    (c,) = containers(obj)
    assert c["name"] == "eval"
    return c


def pool_of(obj: dict[str, Any]) -> str:
    return str(env_of(eval_container(obj))["ASSAYER_POOLS"]["value"])


def eval_deployments(r: Any) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in r.of_kind("Deployment") if d["metadata"]["name"].startswith(EVAL)}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------- Deployments


def test_each_pool_is_a_deployment_whose_workers_serve_that_pool_only(helm: str) -> None:
    r = render(helm, files=POOLS_CASE)
    deployments = eval_deployments(r)
    assert {name: pool_of(d) for name, d in deployments.items()} == {EVAL: "default", GPU: "gpu", CPU_LARGE: "cpu-large"}
    for d in deployments.values():
        c = eval_container(d)
        assert c["args"] == ["worker", "eval"]
        assert [e["name"] for e in c["env"]].count("ASSAYER_POOLS") == 1
        assert c["envFrom"] == eval_container(deployments[EVAL])["envFrom"]  # the same settings
        assert env_of(c)["ASSAYER_REDIS_PASSWORD"] == env_of(eval_container(deployments[EVAL]))["ASSAYER_REDIS_PASSWORD"]
    # One image for all; the gpu pool only changes the tag.
    images = {name: eval_container(d)["image"] for name, d in deployments.items()}
    assert images == {EVAL: "assayer:0.1.0", GPU: "assayer:0.1.0-cuda", CPU_LARGE: "assayer:0.1.0"}


def test_no_deployment_selects_another_pools_pods(helm: str) -> None:
    """Each pool's pods have their own component label: an HPA or a rollout of one pool never counts
    another's pods. The default pool keeps the selector it had before pools (it cannot change)."""
    r = render(helm, files=POOLS_CASE)
    deployments = eval_deployments(r)
    assert deployments[EVAL]["spec"]["selector"] == render(helm).get("Deployment", EVAL)["spec"]["selector"]
    assert pod_labels(deployments[GPU])["app.kubernetes.io/component"] == "eval-gpu"
    for name, d in deployments.items():
        selector = d["spec"]["selector"]["matchLabels"]
        assert selects(selector, pod_labels(d)), name
        others = [other for other, o in deployments.items() if other != name and selects(selector, pod_labels(o))]
        assert others == [], f"{name} selects the pods of {others}"


def test_pools_leave_the_default_pools_deployment_as_it_was(helm: str) -> None:
    pools = {"evalPools": {"gpu": {"gpu": {"enabled": True}, "replicas": 3}}}
    assert render(helm, pools).get("Deployment", EVAL) == render(helm).get("Deployment", EVAL)
    assert pool_of(render(helm).get("Deployment", EVAL)) == "default"
    assert [d for d in eval_deployments(render(helm))] == [EVAL]


def test_every_pool_pod_is_hardened_and_mounts_checkpoints_read_only(helm: str) -> None:
    r = render(helm, files=POOLS_CASE)
    default = eval_deployments(r)[EVAL]
    for name, d in eval_deployments(r).items():
        spec, c = pod_spec(d), eval_container(d)
        assert spec["securityContext"] == pod_spec(default)["securityContext"], name
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"] == eval_container(default)["securityContext"], name
        assert c["securityContext"]["allowPrivilegeEscalation"] is False and c["securityContext"]["privileged"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["automountServiceAccountToken"] is False
        assert mounts_of(c)["checkpoints"]["readOnly"] is True, name
        assert volumes_of(d)["checkpoints"]["persistentVolumeClaim"]["readOnly"] is True, name
        assert mounts_of(c)["results"]["mountPath"] == "/results"
        assert c["livenessProbe"]["exec"]["command"] == ["assayer", "health", "eval"]
        assert spec["terminationGracePeriodSeconds"] == 3600


def test_the_gpu_pool_gets_gpus_gpu_nodes_and_its_own_resources(helm: str) -> None:
    r = render(helm, files=POOLS_CASE)
    gpu = r.get("Deployment", GPU)
    c, spec = eval_container(gpu), pod_spec(gpu)
    assert c["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi"},
        "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1},
    }
    assert spec["nodeSelector"] == {"node-pool": "gpu-l4", "nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["runtimeClassName"] == "nvidia"
    assert volumes_of(gpu)["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    # GPUs for the gpu pool only.
    for name in (EVAL, CPU_LARGE):
        d = r.get("Deployment", name)
        assert "nvidia.com/gpu" not in json.dumps(d), name
        assert "runtimeClassName" not in pod_spec(d) and "shm" not in volumes_of(d)
    assert eval_container(r.get("Deployment", CPU_LARGE))["resources"]["limits"] == {"cpu": "8", "memory": "16Gi"}


def test_a_pool_takes_what_it_does_not_set_from_eval_one_level_deep(helm: str) -> None:
    values = {
        "eval": {
            "gpu": {"count": 2, "runtimeClassName": "nvidia"},
            "nodeSelector": {"zone": "a"},
            "extraEnv": [{"name": "HF_HOME", "value": "/tmp/hf"}],
            "keda": {"enabled": True, "minReplicaCount": 1, "maxReplicaCount": 6},
        },
        "evalPools": {
            # gpu.enabled alone: eval's count and runtime class stay; limits alone: eval's requests stay.
            "gpu": {"gpu": {"enabled": True}, "resources": {"limits": {"memory": "16Gi"}}},
            # explicit false and 0 win over eval's true and 1; a list replaces eval's
            "cpu": {"keda": {"minReplicaCount": 0}, "extraEnv": [], "nodeSelector": {}},
            "fixed": {"keda": {"enabled": False}, "replicas": 2},
        },
    }
    r = render(helm, values)
    gpu = r.get("Deployment", GPU)
    assert eval_container(gpu)["resources"] == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"memory": "16Gi", "nvidia.com/gpu": 2},
    }
    assert pod_spec(gpu)["runtimeClassName"] == "nvidia"
    assert pod_spec(gpu)["nodeSelector"] == {"zone": "a", "nvidia.com/gpu.present": "true"}
    assert env_of(eval_container(gpu))["HF_HOME"]["value"] == "/tmp/hf"
    assert r.get("ScaledObject", GPU)["spec"]["minReplicaCount"] == 1

    cpu = r.get("Deployment", f"{FULLNAME}-eval-cpu")
    assert "nodeSelector" not in pod_spec(cpu) and "HF_HOME" not in env_of(eval_container(cpu))
    scaled = r.get("ScaledObject", f"{FULLNAME}-eval-cpu")["spec"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (0, 6)

    fixed = f"{FULLNAME}-eval-fixed"
    assert r.get("Deployment", fixed)["spec"]["replicas"] == 2
    assert r.find("ScaledObject", fixed) is None and r.find("HorizontalPodAutoscaler", fixed) is None


# ---------------------------------------------------------------- autoscaling


def test_each_pool_scales_on_its_own_queue_and_backfill_queue(helm: str) -> None:
    r = render(helm, files=POOLS_CASE, api_versions=(KEDA_API,))
    scaled = r.get("ScaledObject", GPU)["spec"]
    assert scaled["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": GPU}
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (0, 2)
    assert [(t["name"], t["metadata"]["listName"]) for t in scaled["triggers"]] == [
        ("queue", queue_key("assayer-eval-gpu")),
        ("backfill", queue_key("assayer-eval-gpu-backfill")),
    ]
    (auth,) = r.of_kind("TriggerAuthentication")  # one, shared by every pool's ScaledObject
    assert {t["authenticationRef"]["name"] for t in scaled["triggers"]} == {auth["metadata"]["name"]}
    assert "replicas" not in r.get("Deployment", GPU)["spec"]

    hpa = r.get("HorizontalPodAutoscaler", CPU_LARGE)["spec"]
    assert hpa["scaleTargetRef"]["name"] == CPU_LARGE and hpa["maxReplicas"] == 3
    assert "replicas" not in r.get("Deployment", CPU_LARGE)["spec"]
    # The default pool has no autoscaler here: its replicas, and no ScaledObject or HPA of its own.
    assert r.get("Deployment", EVAL)["spec"]["replicas"] == 2
    assert [o["metadata"]["name"] for o in r.of_kind("ScaledObject")] == [GPU]
    assert [o["metadata"]["name"] for o in r.of_kind("HorizontalPodAutoscaler")] == [CPU_LARGE]


def test_pool_queues_follow_the_eval_queue_setting(helm: str) -> None:
    r = render(helm, {"config": {"evalQueue": "lm"}, "evalPools": {"a100-80g": {"keda": {"enabled": True}}}})
    assert r.config()["ASSAYER_EVAL_QUEUE"] == "lm"
    triggers = r.get("ScaledObject", f"{FULLNAME}-eval-a100-80g")["spec"]["triggers"]
    assert [t["metadata"]["listName"] for t in triggers] == [queue_key("lm-a100-80g"), queue_key("lm-a100-80g-backfill")]


def test_keda_operator_reaches_redis_when_only_a_pool_uses_keda(helm: str) -> None:
    r = render(helm, files=POOLS_CASE)
    peers = r.get("NetworkPolicy", f"{FULLNAME}-redis")["spec"]["ingress"][0]["from"]
    assert {"kubernetes.io/metadata.name": "keda"} in [p.get("namespaceSelector", {}).get("matchLabels") for p in peers]


def test_every_pools_pods_accept_no_connections(helm: str) -> None:
    r = render(helm, files=POOLS_CASE)
    (expression,) = r.get("NetworkPolicy", f"{FULLNAME}-workers")["spec"]["podSelector"]["matchExpressions"]
    for d in eval_deployments(r).values():
        assert pod_labels(d)["app.kubernetes.io/component"] in expression["values"]


def test_notes_name_each_pools_deployment_and_queues(helm: str) -> None:
    notes = render_notes(helm, files=POOLS_CASE)
    assert "--pool NAME=POOL" in notes
    assert (
        f"KEDA scales pool gpu's eval workers (deploy/{GPU}) between 0 and 2 on the Redis lists "
        "rq:queue:assayer-eval-gpu and rq:queue:assayer-eval-gpu-backfill." in notes
    )
    assert f"Pool default's eval workers (deploy/{EVAL}): 2," in notes
    assert "Eval pools" not in render_notes(helm)


# ---------------------------------------------------------------- refused values


POOL_SCHEMA_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("upper-case-pool", {"evalPools": {"GPU": {}}}, '"GPU" does not match'),
    ("underscore-in-pool", {"evalPools": {"gpu_1": {}}}, '"gpu_1" does not match'),
    ("pool-ending-in-dash", {"evalPools": {"gpu-": {}}}, '"gpu-" does not match'),
    ("pool-of-31-characters", {"evalPools": {"a" * 31: {}}}, "does not match"),
    ("unknown-pool-key", {"evalPools": {"gpu": {"gpus": 1}}}, "gpus"),
    ("misspelt-gpu-key", {"evalPools": {"gpu": {"gpu": {"enable": True}}}}, "enable"),
    ("pool-keda-redis-address", {"evalPools": {"gpu": {"keda": {"redisAddress": "r:6379"}}}}, "redisAddress"),
    ("negative-pool-replicas", {"evalPools": {"gpu": {"replicas": -1}}}, "replicas"),
    ("pool-gpu-count-zero", {"evalPools": {"gpu": {"gpu": {"count": 0}}}}, "count"),
    ("pool-as-a-list", {"evalPools": ["gpu"]}, "evalPools"),
]


@pytest.mark.parametrize(("values", "needle"), [c[1:] for c in POOL_SCHEMA_ERRORS], ids=[c[0] for c in POOL_SCHEMA_ERRORS])
def test_schema_refuses_bad_pools(helm: str, values: dict[str, Any], needle: str) -> None:
    error = render_error(helm, values)
    assert "values don't meet the specifications of the schema" in error
    assert needle in error


def test_the_longest_pool_name_is_accepted(helm: str) -> None:
    name = "a" + "-" * 28 + "b"
    assert pool_of(render(helm, {"evalPools": {name: {}}}).get("Deployment", f"{EVAL}-{name}")) == name


POOL_COMBINATIONS: list[tuple[str, dict[str, Any], tuple[str, ...], str]] = [
    (
        "default-in-eval-pools",
        {"evalPools": {"default": {"replicas": 2}}},
        (),
        "evalPools.default is set: the default pool's settings are the eval block",
    ),
    (
        "pool-takes-the-default-backfill-queue",
        {"evalPools": {"backfill": {}}},
        (),
        'the backfill queue of the default pool and the queue of pool backfill (evalPools.backfill) are both the rq queue '
        '"assayer-eval-backfill"',
    ),
    (
        "pool-takes-another-pools-backfill-queue",
        {"evalPools": {"gpu": {}, "gpu-backfill": {}}},
        (),
        'the backfill queue of pool gpu (evalPools.gpu) and the queue of pool gpu-backfill (evalPools.gpu-backfill) are both '
        'the rq queue "assayer-eval-gpu-backfill"',
    ),
    (
        "pool-queue-is-the-watch-queue",
        {"config": {"watchQueue": "assayer-eval-gpu"}, "evalPools": {"gpu": {}}},
        (),
        'config.watchQueue and the queue of pool gpu (evalPools.gpu) are both the rq queue "assayer-eval-gpu"',
    ),
    (
        "pool-keda-and-hpa",
        {"evalPools": {"gpu": {"keda": {"enabled": True}, "hpa": {"enabled": True}}}},
        (KEDA_API,),
        "evalPools.gpu.keda.enabled and evalPools.gpu.hpa.enabled are both true",
    ),
    (
        "pool-keda-without-api",
        {"evalPools": {"gpu": {"keda": {"enabled": True}}}},
        (),
        "evalPools.gpu.keda.enabled is true but the cluster has no keda.sh/v1alpha1 API",
    ),
    (
        "pool-keda-min-above-max",
        {"evalPools": {"gpu": {"keda": {"enabled": True, "minReplicaCount": 3, "maxReplicaCount": 1}}}},
        (KEDA_API,),
        "evalPools.gpu.keda.minReplicaCount 3 is above evalPools.gpu.keda.maxReplicaCount 1",
    ),
    (
        "pool-keda-external-secret-without-address",
        {
            "redis": {"enabled": False},
            "externalRedis": {"existingSecret": "r"},
            "evalPools": {"gpu": {"keda": {"enabled": True}}},
        },
        (KEDA_API,),
        "evalPools.gpu.keda.enabled is true with externalRedis.existingSecret, which needs eval.keda.redisAddress",
    ),
    (
        "pool-hpa-without-cpu-request",
        {"evalPools": {"gpu": {"hpa": {"enabled": True}, "resources": {"requests": {"memory": "1Gi"}}}}},
        (),
        "evalPools.gpu.hpa.enabled needs evalPools.gpu.resources.requests.cpu",
    ),
    (
        "pool-grace-shorter-than-eval-timeout",
        {"config": {"evalTimeout": 1800}, "evalPools": {"gpu": {"terminationGracePeriodSeconds": 600}}},
        (),
        "evalPools.gpu.terminationGracePeriodSeconds (600) is shorter than config.evalTimeout (1800)",
    ),
    (
        "pool-env-names-another-pool",
        {"evalPools": {"gpu": {"extraEnv": [{"name": "ASSAYER_POOLS", "value": "gpu,default"}]}}},
        (),
        "evalPools.gpu.extraEnv sets ASSAYER_POOLS, which the chart sets to the Deployment's pool (gpu)",
    ),
    (
        "results-rwo-with-a-pool",
        {"results": {"persistence": {"accessMode": "ReadWriteOnce"}}, "evalPools": {"gpu": {}}},
        (),
        "results.persistence.accessMode is ReadWriteOnce but up to 2 eval pods write results",
    ),
]


@pytest.mark.parametrize(
    ("values", "api", "message"), [c[1:] for c in POOL_COMBINATIONS], ids=[c[0] for c in POOL_COMBINATIONS]
)
def test_bad_pool_is_refused_with_its_message(helm: str, values: dict[str, Any], api: tuple[str, ...], message: str) -> None:
    error = render_error(helm, values, api_versions=api)
    assert message in error
    assert "assayer: invalid values (1 problem):" in error


def test_a_problem_a_pool_takes_from_eval_is_reported_once_for_eval(helm: str) -> None:
    values = {"config": {"evalTimeout": 7200}, "evalPools": {"gpu": {}, "cpu": {"replicas": 2}}}
    error = render_error(helm, values)
    assert "(1 problem)" in error and "eval.terminationGracePeriodSeconds (3600)" in error
    values = {"eval": {"keda": {"enabled": True}}, "evalPools": {"gpu": {"keda": {"maxReplicaCount": 2}}}}
    error = render_error(helm, values)
    assert "eval.keda.enabled is true but the cluster has no keda.sh/v1alpha1 API" in error and "(1 problem)" in error


def test_valid_neighbours_of_the_bad_pools_render(helm: str) -> None:
    render(helm, {"evalPools": {"gpu-backfill": {}, "backfills": {}}})  # no pool gpu, no pool s
    render(helm, {"config": {"evalTimeout": 1800}, "evalPools": {"gpu": {"terminationGracePeriodSeconds": 1800}}})
    one_pod = {"eval": {"replicas": 0}, "evalPools": {"gpu": {"replicas": 1}}}
    render(helm, {"results": {"persistence": {"accessMode": "ReadWriteOnce"}}, **one_pod})
    render(helm, {"evalPools": {"gpu": {"hpa": {"enabled": True}}}})  # eval's cpu request stays
    render(
        helm,
        {
            "redis": {"enabled": False},
            "externalRedis": {"existingSecret": "r"},
            "eval": {"keda": {"redisAddress": "redis.db:6379"}},
            "evalPools": {"gpu": {"keda": {"enabled": True}}},
        },
    )


# ---------------------------------------------------------------- schema


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return dict(json.loads((CHART / "values.schema.json").read_text()))


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """The eval key a pool key's allOf/$ref points at."""
    (ref,) = node["allOf"]
    target: Any = schema
    for part in ref["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return dict(target)


def test_a_pool_may_set_every_eval_key_and_each_is_described(schema: dict[str, Any]) -> None:
    pools = schema["properties"]["evalPools"]
    assert pools["propertyNames"]["pattern"] == POOL_RE
    assert pools["default"] == {} and yaml.safe_load((CHART / "values.yaml").read_text())["evalPools"] == {}
    pool = pools["additionalProperties"]
    assert pool["additionalProperties"] is False
    eval_ = schema["properties"]["eval"]["properties"]
    assert set(pool["properties"]) == set(eval_)
    for key, node in pool["properties"].items():
        assert "this pool" in node["description"], key
        if key == "keda":  # all but the Redis connection, which every pool shares
            assert node["additionalProperties"] is False
            assert set(node["properties"]) == set(eval_["keda"]["properties"]) - {
                "redisAddress", "redisDatabaseIndex", "redisEnableTLS"
            }
            for sub, subnode in node["properties"].items():
                assert subnode["description"] and resolve(schema, subnode) == eval_["keda"]["properties"][sub], sub
        else:
            assert resolve(schema, node) == eval_[key], key
