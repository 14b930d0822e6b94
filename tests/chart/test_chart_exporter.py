"""Prometheus metrics (issue #13): `assayer exporter` in its own Deployment, its Service annotated
for scraping, an optional prometheus-operator ServiceMonitor, and a NetworkPolicy that keeps the
password-less /metrics to the peers the values name."""

from __future__ import annotations

import json
from typing import Any

import pytest
from chartlib import (
    CI_VALUES_DIR,
    FULLNAME,
    KEDA_API,
    MONITORING_API,
    NAMESPACE,
    Rendered,
    containers,
    env_of,
    pod_labels,
    pod_spec,
    render,
    render_error,
    render_notes,
    volumes_of,
)

pytestmark = pytest.mark.chart

EXPORTER = f"{FULLNAME}-exporter"
REDIS = f"{FULLNAME}-redis"
DASHBOARD = f"{FULLNAME}-dashboard"
METRICS_CASE = (CI_VALUES_DIR / "metrics-values.yaml",)
SCRAPE_ANNOTATIONS = {"prometheus.io/scrape": "true", "prometheus.io/port": "9182", "prometheus.io/path": "/metrics"}
MONITOR_ON = {"exporter": {"serviceMonitor": {"enabled": True}}}
PROMETHEUS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (only,) = containers(obj)
    return only


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def exporter_objects(r: Rendered) -> list[str]:
    return [n for n in r.names() if "exporter" in n]


# ---------------------------------------------------------------- defaults


def test_default_render_has_the_exporter_deployment_and_an_annotated_service(helm: str) -> None:
    r = render(helm)
    assert sorted(exporter_objects(r)) == sorted(
        [f"Deployment/{EXPORTER}", f"Service/{EXPORTER}", f"NetworkPolicy/{EXPORTER}"]
    )
    assert r.of_kind("ServiceMonitor") == []

    dep = r.get("Deployment", EXPORTER)
    assert dep["spec"]["replicas"] == 1
    c = container(dep)
    assert c["args"] == ["exporter"] and "command" not in c
    assert c["image"] == "assayer:0.1.0"
    assert c["ports"] == [{"name": "metrics", "containerPort": 9182, "protocol": "TCP"}]
    assert [e["configMapRef"]["name"] for e in c["envFrom"]] == [f"{FULLNAME}-config"]

    svc = r.get("Service", EXPORTER)
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9182, "targetPort": "metrics", "protocol": "TCP"}]
    assert svc["metadata"]["annotations"] == SCRAPE_ANNOTATIONS
    assert selects(svc["spec"]["selector"], pod_labels(dep))
    assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "exporter"


def test_the_exporter_listens_on_all_interfaces_at_the_configured_port(helm: str) -> None:
    env = env_of(container(render(helm).get("Deployment", EXPORTER)))
    assert env["ASSAYER_EXPORTER_BIND"] == {"name": "ASSAYER_EXPORTER_BIND", "value": "0.0.0.0"}
    assert env["ASSAYER_EXPORTER_PORT"] == {"name": "ASSAYER_EXPORTER_PORT", "value": "9182"}

    r = render(helm, {"exporter": {"port": 9300}})
    c = container(r.get("Deployment", EXPORTER))
    assert env_of(c)["ASSAYER_EXPORTER_PORT"]["value"] == "9300"
    assert c["ports"][0]["containerPort"] == 9300
    svc = r.get("Service", EXPORTER)
    assert svc["spec"]["ports"][0]["port"] == 9300
    assert svc["metadata"]["annotations"]["prometheus.io/port"] == "9300"


def test_the_exporter_gets_the_redis_connection_of_the_other_pods(helm: str) -> None:
    for values in ({}, {"redis": {"enabled": False}, "externalRedis": {"existingSecret": "team-redis",
                                                                          "existingSecretPasswordKey": "pw"}}):
        r = render(helm, values)
        exporter = env_of(container(r.get("Deployment", EXPORTER)))
        dashboard = env_of(container(r.get("Deployment", DASHBOARD)))
        for name in ("ASSAYER_REDIS_URL", "ASSAYER_REDIS_PASSWORD"):
            assert exporter[name] == dashboard[name], name
        assert "value" not in exporter["ASSAYER_REDIS_PASSWORD"]


def test_the_exporter_mounts_no_checkpoint_evaluator_or_results_volume(helm: str) -> None:
    r = render(helm, {"evaluators": {"files": {"e.py": "def evaluate(path): ..."}}, "trackers": {"reportTo": "tensorboard"}})
    dep = r.get("Deployment", EXPORTER)
    assert set(volumes_of(dep)) == {"home", "tmp"}
    assert {m["name"] for m in container(dep)["volumeMounts"]} == {"home", "tmp"}
    assert "PYTHONPATH" not in env_of(container(dep))


def test_probes_fetch_metrics(helm: str) -> None:
    c = container(render(helm).get("Deployment", EXPORTER))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
        assert c[probe]["timeoutSeconds"] >= 5, probe


def test_the_exporter_pod_is_hardened(helm: str) -> None:
    dep = render(helm).get("Deployment", EXPORTER)
    spec = pod_spec(dep)
    assert spec["enableServiceLinks"] is False
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(dep)["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    resources = container(dep)["resources"]
    assert set(resources) == {"requests", "limits"}


def test_component_values_reach_the_pod(helm: str) -> None:
    values = {
        "exporter": {
            "replicas": 2,
            "nodeSelector": {"pool": "system"},
            "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}]}}},
            "podAnnotations": {"example.com/a": "1"},
            "podLabels": {"example.com/l": "x"},
            "priorityClassName": "monitoring",
            "extraEnv": [{"name": "ASSAYER_LOG_LEVEL", "value": "DEBUG"}],
        }
    }
    dep = render(helm, values).get("Deployment", EXPORTER)
    spec = pod_spec(dep)
    assert dep["spec"]["replicas"] == 2
    assert spec["nodeSelector"] == {"pool": "system"}
    assert spec["tolerations"] == values["exporter"]["tolerations"]
    assert spec["affinity"] == values["exporter"]["affinity"]
    assert spec["priorityClassName"] == "monitoring"
    assert dep["spec"]["template"]["metadata"]["annotations"]["example.com/a"] == "1"
    assert "checksum/config" in dep["spec"]["template"]["metadata"]["annotations"]
    assert pod_labels(dep)["example.com/l"] == "x"
    assert env_of(container(dep))["ASSAYER_LOG_LEVEL"]["value"] == "DEBUG"
    assert "priorityClassName" not in pod_spec(render(helm).get("Deployment", EXPORTER))


def test_the_exporter_rolls_when_the_settings_change(helm: str) -> None:
    def checksum(r: Rendered) -> str:
        return str(r.get("Deployment", EXPORTER)["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum(render(helm)) != checksum(render(helm, {"config": {"evalQueue": "other"}}))


# ---------------------------------------------------------------- scrape annotations


def test_scrape_annotations_can_be_switched_off_and_extended(helm: str) -> None:
    off = render(helm, {"exporter": {"scrapeAnnotations": False}}).get("Service", EXPORTER)
    assert "annotations" not in off["metadata"]
    extra = {"example.com/team": "ml", "prometheus.io/path": "/metrics"}
    r = render(helm, {"exporter": {"service": {"annotations": {"example.com/team": "ml", "prometheus.io/scrape": "false"}}}})
    annotations = r.get("Service", EXPORTER)["metadata"]["annotations"]
    assert annotations == {**SCRAPE_ANNOTATIONS, "example.com/team": "ml", "prometheus.io/scrape": "false"}
    only_extra = render(helm, {"exporter": {"scrapeAnnotations": False, "service": {"annotations": extra}}})
    assert only_extra.get("Service", EXPORTER)["metadata"]["annotations"] == extra


def test_only_the_exporter_service_is_annotated_for_scraping(helm: str) -> None:
    """The dashboard's /metrics is behind basic auth: Prometheus annotations would only scrape 401s."""
    for svc in render(helm).of_kind("Service"):
        name = svc["metadata"]["name"]
        if name != EXPORTER:
            assert not any(k.startswith("prometheus.io/") for k in svc["metadata"].get("annotations", {})), name


# ---------------------------------------------------------------- ServiceMonitor


def test_service_monitor_selects_the_exporter_service_and_its_port(helm: str) -> None:
    r = render(helm, MONITOR_ON)
    (monitor,) = r.of_kind("ServiceMonitor")
    assert monitor["apiVersion"] == MONITORING_API
    assert monitor["metadata"]["name"] == EXPORTER
    assert monitor["metadata"]["namespace"] == NAMESPACE
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = r.of_kind("Service")
    assert [s["metadata"]["name"] for s in services if selects(selector, s["metadata"]["labels"])] == [EXPORTER]
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = r.get("Service", EXPORTER)["spec"]["ports"]
    assert endpoint == {"port": port["name"], "path": "/metrics", "scheme": "http", "interval": "30s", "scrapeTimeout": "10s"}
    # the annotations stay on by default (a Prometheus without the operator may scrape them)
    assert r.get("Service", EXPORTER)["metadata"]["annotations"] == SCRAPE_ANNOTATIONS


def test_service_monitor_values(helm: str) -> None:
    r = render(helm, files=METRICS_CASE)
    (monitor,) = r.of_kind("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["metadata"]["labels"]["app.kubernetes.io/component"] == "exporter"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["interval"] == "1m" and endpoint["scrapeTimeout"] == "20s"
    assert r.get("Service", EXPORTER)["metadata"]["annotations"] == {"example.com/team": "ml-platform"}
    r = render(helm, {"exporter": {"serviceMonitor": {"enabled": True, "interval": "", "scrapeTimeout": ""}}})
    (endpoint,) = r.of_kind("ServiceMonitor")[0]["spec"]["endpoints"]
    assert "interval" not in endpoint and "scrapeTimeout" not in endpoint  # Prometheus' global settings


def test_exporter_disabled_renders_none_of_its_objects(helm: str) -> None:
    r = render(helm, {"exporter": {"enabled": False}}, api_versions=(MONITORING_API,))
    assert exporter_objects(r) == []
    assert r.of_kind("ServiceMonitor") == []
    assert not [w for w in r.workloads() if "exporter" in json.dumps(container(w).get("args", []))]
    assert "Prometheus metrics" not in render_notes(helm, {"exporter": {"enabled": False}})


def test_the_keda_trigger_is_unchanged(helm: str) -> None:
    keda = {"eval": {"keda": {"enabled": True}}}
    with_exporter = render(helm, keda, MONITOR_ON)
    without = render(helm, keda, {"exporter": {"enabled": False}})
    for kind, name in (("ScaledObject", f"{FULLNAME}-eval"), ("TriggerAuthentication", f"{FULLNAME}-eval-redis")):
        assert with_exporter.get(kind, name) == without.get(kind, name)
    triggers = with_exporter.get("ScaledObject", f"{FULLNAME}-eval")["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["redis", "redis"]  # the queue and its backfill queue


# ---------------------------------------------------------------- NetworkPolicy


def exporter_sources(r: Rendered) -> list[dict[str, Any]]:
    """The peers the exporter's NetworkPolicy admits, on its metrics port only."""
    policy = r.get("NetworkPolicy", EXPORTER)
    spec = policy["spec"]
    assert selects(spec["podSelector"]["matchLabels"], pod_labels(r.get("Deployment", EXPORTER)))
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "exporter"
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    return list(rule["from"])


def test_network_policy_limits_scrapes_to_the_named_peers(helm: str) -> None:
    # no peer named: pods of the release's namespace only, never "from anyone"
    assert exporter_sources(render(helm)) == [{"podSelector": {}}]
    assert exporter_sources(render(helm, files=METRICS_CASE)) == [PROMETHEUS_PEER]
    two = [PROMETHEUS_PEER, {"ipBlock": {"cidr": "10.9.0.0/16"}}]
    assert exporter_sources(render(helm, {"networkPolicy": {"exporterFrom": two}})) == two
    assert render(helm, {"networkPolicy": {"enabled": False}}).find("NetworkPolicy", EXPORTER) is None


def test_no_other_policy_opens_the_exporter(helm: str) -> None:
    r = render(helm)
    labels = pod_labels(r.get("Deployment", EXPORTER))
    for policy in r.of_kind("NetworkPolicy"):
        if policy["metadata"]["name"] == EXPORTER:
            continue
        selector = policy["spec"]["podSelector"]
        chosen = selects(selector.get("matchLabels", {}), labels) and all(
            labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", [])
        )
        assert not chosen, policy["metadata"]["name"]


def test_redis_policy_admits_the_exporter(helm: str) -> None:
    r = render(helm, files=METRICS_CASE)
    labels = pod_labels(r.get("Deployment", EXPORTER))
    (rule,) = r.get("NetworkPolicy", REDIS)["spec"]["ingress"]
    pod_peers = [p["podSelector"]["matchLabels"] for p in rule["from"] if set(p) == {"podSelector"}]
    assert any(selects(peer, labels) for peer in pod_peers)
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]


def test_notes_tell_where_the_metrics_are_and_who_may_scrape(helm: str) -> None:
    notes = render_notes(helm)
    assert f"http://{EXPORTER}.{NAMESPACE}.svc:9182/metrics" in notes
    assert "prometheus.io/scrape" in notes
    assert "networkPolicy.exporterFrom" in notes
    notes = render_notes(helm, files=METRICS_CASE)
    assert f'ServiceMonitor "{EXPORTER}"' in notes and "every 1m" in notes
    assert "networkPolicy.exporterFrom" not in notes


# ---------------------------------------------------------------- refused values


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"exporter": {"prot": 9182}}, "prot"),
        ({"exporter": {"serviceMonitor": {"enabled": True, "namespace": "monitoring"}}}, "namespace"),
        ({"exporter": {"service": {"type": "NodePort"}}}, "type"),
        ({"exporter": {"port": 0}}, "port"),
        ({"exporter": {"serviceMonitor": {"interval": "30 seconds"}}}, "interval"),
        ({"exporter": {"scrapeAnnotations": "yes"}}, "scrapeAnnotations"),
        ({"networkPolicy": {"exporterFrom": {"podSelector": {}}}}, "exporterFrom"),
    ],
    ids=["unknown-key", "unknown-service-monitor-key", "unknown-service-key", "port-zero", "bad-duration",
         "annotations-not-a-boolean", "peers-not-a-list"],
)
def test_schema_refuses_bad_exporter_values(helm: str, values: dict[str, Any], needle: str) -> None:
    error = render_error(helm, values, api_versions=(MONITORING_API,))
    assert "values don't meet the specifications of the schema" in error
    assert needle in error


@pytest.mark.parametrize(
    ("values", "api", "message"),
    [
        (MONITOR_ON, (), "exporter.serviceMonitor.enabled is true but the cluster has no monitoring.coreos.com/v1 API"),
        ({"exporter": {"enabled": False, "serviceMonitor": {"enabled": True}}}, (MONITORING_API,),
         "exporter.serviceMonitor.enabled is true but exporter.enabled is false"),
        ({"exporter": {"serviceMonitor": {"enabled": True, "interval": "1m", "scrapeTimeout": "1m500ms"}}}, (MONITORING_API,),
         "exporter.serviceMonitor.scrapeTimeout (1m500ms) is longer than exporter.serviceMonitor.interval (1m)"),
    ],
    ids=["without-the-api", "without-the-exporter", "timeout-above-interval"],
)
def test_bad_service_monitor_combinations_are_refused(
    helm: str, values: dict[str, Any], api: tuple[str, ...], message: str
) -> None:
    error = render_error(helm, values, api_versions=api)
    assert message in error
    assert "assayer: invalid values (1 problem):" in error


def test_valid_neighbours_of_the_refused_service_monitors_render(helm: str) -> None:
    for sm in ({"interval": "1m", "scrapeTimeout": "1m"}, {"interval": "1h", "scrapeTimeout": "59m59s"},
               {"interval": "", "scrapeTimeout": "30s"}, {"interval": "2s", "scrapeTimeout": "1500ms"}):
        assert render(helm, {"exporter": {"serviceMonitor": {"enabled": True, **sm}}}).of_kind("ServiceMonitor")
    # without the API the ServiceMonitor is only refused when asked for
    render(helm, api_versions=())
    render(helm, {"eval": {"keda": {"enabled": True}}}, MONITOR_ON, api_versions=(KEDA_API, MONITORING_API))
