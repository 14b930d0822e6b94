"""Invalid values are refused with a message that names the keys and the fix; every problem of a
values file is reported at once."""

from __future__ import annotations

from typing import Any

import pytest
from chartlib import KEDA_API, render, render_error

pytestmark = pytest.mark.chart

NO_CHECKPOINTS = {"checkpoints": {"persistence": {"enabled": False}}}

COMBINATIONS: list[tuple[str, dict[str, Any], tuple[str, ...], str]] = [
    (
        "keda-and-hpa",
        {"eval": {"keda": {"enabled": True}, "hpa": {"enabled": True}}},
        (KEDA_API,),
        "eval.keda.enabled and eval.hpa.enabled are both true",
    ),
    ("keda-without-api", {"eval": {"keda": {"enabled": True}}}, (), "no keda.sh/v1alpha1 API: install KEDA first"),
    (
        "keda-min-above-max",
        {"eval": {"keda": {"enabled": True, "minReplicaCount": 5, "maxReplicaCount": 2}}},
        (KEDA_API,),
        "eval.keda.minReplicaCount 5 is above eval.keda.maxReplicaCount 2",
    ),
    (
        "keda-external-secret-without-address",
        {"redis": {"enabled": False}, "externalRedis": {"existingSecret": "r"}, "eval": {"keda": {"enabled": True}}},
        (KEDA_API,),
        "needs eval.keda.redisAddress",
    ),
    (
        "keda-password-inside-url",
        {
            "redis": {"enabled": False},
            "externalRedis": {"url": "redis://:pw@r.example:6379/0"},
            "eval": {"keda": {"enabled": True}},
        },
        (KEDA_API,),
        "move it to externalRedis.password so KEDA can authenticate too",
    ),
    (
        "keda-unix-socket",
        {"redis": {"enabled": False}, "externalRedis": {"url": "unix:///run/redis.sock"}, "eval": {"keda": {"enabled": True}}},
        (KEDA_API,),
        "KEDA's operator cannot reach a socket",
    ),
    (
        "hpa-min-above-max",
        {"eval": {"hpa": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        (),
        "eval.hpa.minReplicas 5 is above eval.hpa.maxReplicas 2",
    ),
    (
        "hpa-without-cpu-request",
        {"eval": {"hpa": {"enabled": True}, "resources": {"requests": {"cpu": None}}}},
        (),
        "eval.hpa.enabled needs eval.resources.requests.cpu",
    ),
    ("no-redis", {"redis": {"enabled": False}}, (), "neither externalRedis.url nor externalRedis.existingSecret"),
    ("two-redis", {"externalRedis": {"url": "redis://r:6379/0"}}, (), "redis.enabled is true and externalRedis is set"),
    (
        "external-url-and-secret",
        {"redis": {"enabled": False}, "externalRedis": {"url": "redis://r:6379/0", "existingSecret": "s"}},
        (),
        "externalRedis.url and externalRedis.existingSecret are both set",
    ),
    (
        "external-password-and-secret",
        {"redis": {"enabled": False}, "externalRedis": {"existingSecret": "s", "password": "p"}},
        (),
        "externalRedis.password and externalRedis.existingSecret are both set",
    ),
    (
        "redis-password-and-secret",
        {"redis": {"auth": {"password": "p", "existingSecret": "s"}}},
        (),
        "redis.auth.password and redis.auth.existingSecret are both set",
    ),
    ("no-checkpoints", NO_CHECKPOINTS, (), "no checkpoint volume: set one of checkpoints.existingClaim"),
    (
        "two-checkpoint-sources",
        {"checkpoints": {"existingClaim": "c"}},
        (),
        "several checkpoint volumes (checkpoints.existingClaim, checkpoints.persistence.enabled)",
    ),
    (
        "results-claim-twice",
        {"results": {"existingClaim": "r"}},
        (),
        "results.existingClaim and results.persistence.enabled are both set",
    ),
    (
        "results-rwo-with-many-eval-pods",
        {"results": {"persistence": {"accessMode": "ReadWriteOnce"}}, "eval": {"replicas": 3}},
        (),
        "results.persistence.accessMode is ReadWriteOnce but up to 3 eval pods write results",
    ),
    (
        "results-rwo-with-keda",
        {"results": {"persistence": {"accessMode": "ReadWriteOnce"}}, "eval": {"keda": {"enabled": True}}},
        (KEDA_API,),
        "up to 4 eval pods write results",
    ),
    (
        "two-evaluator-sources",
        {"evaluators": {"existingConfigMap": "e", "volume": {"emptyDir": {}}}},
        (),
        "several evaluator sources (evaluators.existingConfigMap, evaluators.volume)",
    ),
    (
        "duplicate-watch",
        {
            "watches": [
                {"name": "a", "directory": "x", "evaluator": "m:f"},
                {"name": "a", "directory": "run-b", "evaluator": "m:f"},
            ]
        },
        (),
        'watches[1].name "a" is used twice',
    ),
    (
        "watch-outside-mount",
        {"watches": [{"name": "a", "directory": "/data/run", "evaluator": "m:f"}]},
        (),
        'watches[0].directory "/data/run" is outside checkpoints.mountPath "/checkpoints"',
    ),
    (
        "watch-prefix-is-not-inside",
        {"watches": [{"name": "a", "directory": "/checkpoints2/run", "evaluator": "m:f"}]},
        (),
        "is outside checkpoints.mountPath",
    ),
    ("same-queue", {"config": {"watchQueue": "q", "evalQueue": "q"}}, (), 'config.watchQueue and config.evalQueue are both "q"'),
    (
        "grace-shorter-than-eval-timeout",
        {"config": {"evalTimeout": 7200}},
        (),
        "eval.terminationGracePeriodSeconds (3600) is shorter than config.evalTimeout (7200)",
    ),
    (
        "heartbeat-too-slow-for-lease",
        {"config": {"heartbeatInterval": 10.0}},
        (),
        "config.heartbeatInterval (10) must be at most half of config.leaseTTL (15)",
    ),
    (
        "dashboard-password-and-secret",
        {"dashboard": {"auth": {"password": "p", "existingSecret": "s"}}},
        (),
        "dashboard.auth.password and dashboard.auth.existingSecret are both set",
    ),
    (
        "ingress-without-dashboard",
        {"dashboard": {"enabled": False, "ingress": {"enabled": True}}},
        (),
        "dashboard.ingress.enabled is true but dashboard.enabled is false",
    ),
    (
        "ingress-the-network-policy-does-not-admit",
        {"dashboard": {"ingress": {"enabled": True}}, "networkPolicy": {"dashboard": {"ingressController": {"namespace": ""}}}},
        (),
        "dashboard.ingress.enabled is true but the dashboard's NetworkPolicy admits no Ingress controller",
    ),
    (
        "snapshots-without-a-claim",
        {"snapshots": {"enabled": True, "persistence": {"enabled": False}}},
        (),
        "an emptyDir cannot be shared: watch and eval are separate pods",
    ),
    (
        "snapshots-claim-and-existing-claim",
        {"snapshots": {"enabled": True, "existingClaim": "s"}},
        (),
        "snapshots.existingClaim and snapshots.persistence.enabled are both set",
    ),
    (
        "snapshots-claim-one-node-only",
        {"snapshots": {"enabled": True, "persistence": {"accessMode": "ReadWriteOnce"}}},
        (),
        "snapshots.persistence.accessMode is ReadWriteOnce but the watch pods write snapshots and the eval pods read them",
    ),
]


@pytest.mark.parametrize(("values", "api", "message"), [c[1:] for c in COMBINATIONS], ids=[c[0] for c in COMBINATIONS])
def test_bad_combination_is_refused_with_its_message(
    helm: str, values: dict[str, Any], api: tuple[str, ...], message: str
) -> None:
    error = render_error(helm, values, api_versions=api)
    assert message in error
    assert "assayer: invalid values (1 problem):" in error


def test_every_problem_is_reported_at_once(helm: str) -> None:
    values = {
        "redis": {"enabled": False},
        "checkpoints": {"persistence": {"enabled": False}},
        "eval": {"keda": {"enabled": True}, "hpa": {"enabled": True}},
        "config": {"watchQueue": "q", "evalQueue": "q"},
    }
    error = render_error(helm, values, api_versions=(KEDA_API,))
    assert "(4 problems)" in error
    for fragment in ("neither externalRedis.url", "no checkpoint volume", "both true", 'are both "q"'):
        assert fragment in error


def test_valid_neighbours_of_the_bad_combinations_render(helm: str) -> None:
    """The checks are not over-eager: the fixed versions of some refused values are accepted."""
    render(helm, {"checkpoints": {"existingClaim": "c", "persistence": {"enabled": False}}})
    render(helm, {"watches": [{"name": "a", "directory": "/checkpoints", "evaluator": "m:f"}]})
    render(helm, {"config": {"evalTimeout": 600}})
    render(helm, {"dashboard": {"ingress": {"enabled": True}}, "networkPolicy": {
        "dashboard": {"ingressController": {"namespace": ""}}, "dashboardFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}})
    render(helm, {"dashboard": {"ingress": {"enabled": True}}, "networkPolicy": {
        "enabled": False, "dashboard": {"ingressController": {"namespace": ""}}}})
    render(helm, {"results": {"persistence": {"accessMode": "ReadWriteOnce"}}, "eval": {"replicas": 1}})
    render(helm, {"snapshots": {"enabled": True, "existingClaim": "s", "persistence": {"enabled": False}}})
    # Disabled snapshots need no claim.
    render(helm, {"snapshots": {"persistence": {"enabled": False, "accessMode": "ReadWriteOnce"}}})
    render(
        helm,
        {
            "redis": {"enabled": False},
            "externalRedis": {"existingSecret": "r"},
            "eval": {"keda": {"enabled": True, "redisAddress": "redis.db:6379"}},
        },
    )


SCHEMA_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown-top-level-key", {"evalWorkers": {"replicas": 2}}, "evalWorkers"),
    ("misspelt-nested-key", {"eval": {"gpu": {"enable": True}}}, "enable"),
    ("wrong-type", {"eval": {"replicas": "two"}}, "replicas"),
    ("gpu-count-zero", {"eval": {"gpu": {"count": 0}}}, "count"),
    ("bad-pull-policy", {"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ("bad-checkpoint-access-mode", {"checkpoints": {"persistence": {"accessMode": "ReadWriteOnce"}}}, "accessMode"),
    ("relative-mount-path", {"checkpoints": {"mountPath": "checkpoints"}}, "mountPath"),
    ("redis-url-without-scheme", {"redis": {"enabled": False}, "externalRedis": {"url": "r:6379"}}, "url"),
    ("watch-without-evaluator", {"watches": [{"name": "a", "directory": "x"}]}, "evaluator"),
    ("watch-unknown-field", {"watches": [{"name": "a", "directory": "x", "evaluator": "m:f", "evaluater": "m:f"}]}, "evaluater"),
    ("watch-unknown-layout", {"watches": [{"name": "a", "directory": "x", "evaluator": "m:f", "layout": "hf5"}]}, "layout"),
    ("watch-marker-with-a-slash",
     {"watches": [{"name": "a", "directory": "x", "evaluator": "m:f", "ready_markers": ["../DONE"]}]}, "ready_markers"),
    ("bad-evaluator-file-name", {"evaluators": {"files": {"a/b.py": "x"}}}, "a/b.py"),
    ("bad-retry-backoff", {"config": {"retryBackoff": "10s,60s"}}, "retryBackoff"),
    ("bad-log-level", {"config": {"logLevel": "LOUD"}}, "logLevel"),
    ("image-tag-as-number", {"redis": {"image": {"tag": 7.2}}}, "tag"),
    ("bad-snapshot-mode", {"snapshots": {"mode": "hardlink"}}, "mode"),
    ("negative-snapshot-bound", {"snapshots": {"maxGb": -1}}, "maxGb"),
    ("relative-snapshot-mount-path", {"snapshots": {"mountPath": "snapshots"}}, "mountPath"),
    ("snapshots-emptydir", {"snapshots": {"emptyDir": {"sizeLimit": "10Gi"}}}, "emptyDir"),
]


@pytest.mark.parametrize(("values", "needle"), [c[1:] for c in SCHEMA_ERRORS], ids=[c[0] for c in SCHEMA_ERRORS])
def test_schema_refuses_bad_values(helm: str, values: dict[str, Any], needle: str) -> None:
    error = render_error(helm, values)
    assert "values don't meet the specifications of the schema" in error
    assert needle in error
