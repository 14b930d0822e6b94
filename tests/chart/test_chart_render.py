"""helm lint --strict, and every object of every values case validated offline against the
Kubernetes schemas (strict: unknown fields fail), KEDA's and prometheus-operator's, on the oldest
and newest supported Kubernetes release."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from chartlib import (
    CHART,
    FULLNAME,
    KEDA_API,
    MONITORING_API,
    SCHEMAS,
    case_name,
    ci_values_files,
    in_ci,
    render,
    require_tool,
)

pytestmark = pytest.mark.chart

try:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError
except ImportError:  # pragma: no cover - depends on the environment
    kubernetes_validate = None

CASES = ci_values_files()
CASE_IDS = [case_name(p) for p in CASES]
# Custom resources, validated against the schemas vendored in tests/chart/schemas.
CRD_SCHEMAS = {
    (KEDA_API, "ScaledObject"): SCHEMAS / "keda-scaledobject-v1alpha1.json",
    (KEDA_API, "TriggerAuthentication"): SCHEMAS / "keda-triggerauthentication-v1alpha1.json",
    (MONITORING_API, "ServiceMonitor"): SCHEMAS / "prometheus-servicemonitor-v1.json",
}
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")


def min_kube_version() -> str:
    """The oldest Kubernetes release the chart supports, from Chart.yaml's kubeVersion (">=1.27.0-0")."""
    kube: str = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    return kube.removeprefix(">=").split("-")[0]


def kube_versions() -> list[str]:
    if kubernetes_validate is None:
        return [min_kube_version()]
    return [min_kube_version(), kubernetes_validate.latest_version()]


@pytest.fixture(scope="module")
def k8s_validate() -> Any:
    if kubernetes_validate is None:
        message = "kubernetes-validate is not installed (pip install kubernetes-validate; bash .ci/install-helm.sh)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return kubernetes_validate


def validate_object(k8s: Any, obj: dict[str, Any], version: str) -> None:
    """Raise if obj is not a valid object of its kind: KEDA and prometheus-operator kinds against the
    vendored schemas, everything else against kubernetes-validate's strict schemas. Unknown kinds are errors."""
    if obj["apiVersion"].startswith(CRD_GROUPS):
        path = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if path is None:
            raise AssertionError(f"no schema for {obj['apiVersion']} {obj['kind']} in tests/chart/schemas")
        jsonschema.Draft202012Validator(json.loads(path.read_text())).validate(obj)
        return
    try:
        k8s.validate(obj, version, strict=True)
    except SchemaNotFoundError as exc:
        raise AssertionError(f"no schema for {obj['apiVersion']} {obj['kind']} in Kubernetes {version}") from exc


def test_matrix_names_every_case() -> None:
    cases = {"default", "gpu", "keda", "external-redis", "existing-claim", "hostpath", "ingress", "metrics", "pools"}
    assert cases <= set(CASE_IDS)


@pytest.mark.parametrize("values_file", CASES, ids=CASE_IDS)
def test_helm_lint_strict(helm: str, values_file: Path) -> None:
    # In lint mode helm downgrades the chart's own `fail` to a message (the KEDA cases, which need
    # --api-versions, are refused by helm template instead: see test_chart_values.py).
    proc = subprocess.run(
        [helm, "lint", "--strict", str(CHART), "-f", str(values_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout


def test_helm_lint_strict_catches_schema_errors(helm: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval:\n  replica: 2\n")
    proc = subprocess.run(
        [helm, "lint", "--strict", str(CHART), "-f", str(bad)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode != 0
    assert "replica" in proc.stdout + proc.stderr


@pytest.mark.parametrize("kube_version", kube_versions())
@pytest.mark.parametrize("values_file", CASES, ids=CASE_IDS)
def test_every_object_validates_strictly(helm: str, k8s_validate: Any, values_file: Path, kube_version: str) -> None:
    rendered = render(helm, files=(values_file,), kube_version=kube_version)
    assert len(rendered.docs) >= 10, rendered.names()
    errors = []
    for obj in rendered.docs:
        try:
            validate_object(k8s_validate, obj, kube_version)
        except (jsonschema.ValidationError, AssertionError) as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {getattr(exc, 'message', exc)}")
    assert not errors, "\n".join(errors)


def test_strict_validation_rejects_unknown_fields(helm: str, k8s_validate: Any) -> None:
    """The validation above can fail: a misspelt field in a rendered Deployment is caught."""
    rendered = render(helm)
    deployment = copy.deepcopy(rendered.get("Deployment", f"{FULLNAME}-eval"))
    validate_object(k8s_validate, deployment, k8s_validate.latest_version())
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(jsonschema.ValidationError):
        validate_object(k8s_validate, deployment, k8s_validate.latest_version())


def test_keda_schema_rejects_a_misspelt_trigger_parameter(helm: str, k8s_validate: Any) -> None:
    rendered = render(helm, {"eval": {"keda": {"enabled": True}}})
    scaled = copy.deepcopy(rendered.get("ScaledObject", f"{FULLNAME}-eval"))
    validate_object(k8s_validate, scaled, k8s_validate.latest_version())
    metadata = scaled["spec"]["triggers"][0]["metadata"]
    metadata["listname"] = metadata.pop("listName")
    with pytest.raises(jsonschema.ValidationError):
        validate_object(k8s_validate, scaled, k8s_validate.latest_version())


def test_service_monitor_schema_rejects_a_misspelt_endpoint_field(helm: str, k8s_validate: Any) -> None:
    rendered = render(helm, {"exporter": {"serviceMonitor": {"enabled": True}}})
    monitor = copy.deepcopy(rendered.get("ServiceMonitor", f"{FULLNAME}-exporter"))
    validate_object(k8s_validate, monitor, k8s_validate.latest_version())
    endpoint = monitor["spec"]["endpoints"][0]
    endpoint["scrapeTimout"] = endpoint.pop("scrapeTimeout")
    with pytest.raises(jsonschema.ValidationError):
        validate_object(k8s_validate, monitor, k8s_validate.latest_version())
    endpoint["scrapeTimeout"] = "10 seconds"
    del endpoint["scrapeTimout"]
    with pytest.raises(jsonschema.ValidationError):
        validate_object(k8s_validate, monitor, k8s_validate.latest_version())


def test_unknown_kinds_are_errors_not_warnings(k8s_validate: Any) -> None:
    bogus = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    with pytest.raises(AssertionError, match="no schema"):
        validate_object(k8s_validate, bogus, k8s_validate.latest_version())


def test_keda_objects_render_only_with_the_keda_api(helm: str) -> None:
    with_api = render(helm, {"eval": {"keda": {"enabled": True}}}, api_versions=(KEDA_API,))
    assert with_api.of_kind("ScaledObject") and with_api.of_kind("TriggerAuthentication")
    without = render(helm, api_versions=(KEDA_API,))
    assert not without.of_kind("ScaledObject") and not without.of_kind("TriggerAuthentication")


def test_service_monitor_renders_only_with_the_prometheus_operator_api(helm: str) -> None:
    on = {"exporter": {"serviceMonitor": {"enabled": True}}}
    assert render(helm, on, api_versions=(MONITORING_API,)).of_kind("ServiceMonitor")
    assert not render(helm, api_versions=(MONITORING_API,)).of_kind("ServiceMonitor")


def test_missing_tools_fail_in_ci_and_skip_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="helm not found"):
        require_tool("helm", None, "test")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="helm not found"):
        require_tool("helm", None, "test")
    assert require_tool("helm", "/usr/bin/helm", "test") == "/usr/bin/helm"
