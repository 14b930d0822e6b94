"""Helpers of the chart tests: render the chart with the real helm binary, parse what it renders.

helm is found at $HELM, on PATH, or at .cache/bin/helm (where .ci/install-helm.sh may put it).
Without it the chart tests fail under CI=true and are skipped elsewhere, with the reason.
"""

from __future__ import annotations

import base64
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "assayer"
CI_VALUES_DIR = CHART / "ci"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KEDA_API = "keda.sh/v1alpha1"
MONITORING_API = "monitoring.coreos.com/v1"  # prometheus-operator's ServiceMonitor
RELEASE = "assayer"
NAMESPACE = "evals"
FULLNAME = "assayer"  # the release name contains the chart name, so the prefix is just "assayer"

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Pod")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_tool(what: str, found: str | None, hint: str) -> str:
    """The tool's path; otherwise fail (CI) or skip (elsewhere) with a reason."""
    if found:
        return found
    message = f"{what} not found ({hint}); run `bash .ci/install-helm.sh`"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def find_helm() -> str | None:
    env = os.environ.get("HELM")
    if env:
        return env if Path(env).is_file() else None
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    local = ROOT / ".cache" / "bin" / "helm"
    return str(local) if local.is_file() else None


def ci_values_files() -> list[Path]:
    return sorted(CI_VALUES_DIR.glob("*-values.yaml"))


def case_name(path: Path) -> str:
    return path.name.removesuffix("-values.yaml")


def wants_keda(values: Mapping[str, Any]) -> bool:
    """KEDA for the default pool (eval) or for any pool of evalPools."""
    pools = [values.get("eval", {}), *values.get("evalPools", {}).values()]
    return any(pool.get("keda", {}).get("enabled") for pool in pools)


def wants_service_monitor(values: Mapping[str, Any]) -> bool:
    return bool(values.get("exporter", {}).get("serviceMonitor", {}).get("enabled"))


def apis_wanted(values: Mapping[str, Any]) -> tuple[str, ...]:
    """The optional APIs (KEDA, prometheus-operator) that the values need the cluster to offer."""
    wanted = ((KEDA_API, wants_keda(values)), (MONITORING_API, wants_service_monitor(values)))
    return tuple(api for api, on in wanted if on)


@dataclass(frozen=True)
class Rendered:
    """The objects of one `helm template` run."""

    docs: tuple[dict[str, Any], ...]
    text: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        for d in self.docs:
            if d["kind"] == kind and d["metadata"]["name"] == name:
                return d
        return None

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = self.find(kind, name)
        assert found is not None, f"{kind}/{name} not rendered; have {sorted(self.names())}"
        return found

    def names(self) -> list[str]:
        return [f"{d['kind']}/{d['metadata']['name']}" for d in self.docs]

    def workloads(self) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] in WORKLOAD_KINDS]

    def config(self) -> dict[str, str]:
        data: dict[str, str] = self.get("ConfigMap", f"{FULLNAME}-config")["data"]
        return data

    def secret_value(self, name: str, key: str) -> str:
        return base64.b64decode(self.get("Secret", name)["data"][key]).decode()


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
    return spec


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = obj["metadata"]["labels"] if obj["kind"] == "Pod" else obj["spec"]["template"]["metadata"]["labels"]
    return labels


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def mounts_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


def volumes_of(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(obj).get("volumes", [])}


def _run_helm(
    helm: str,
    values: tuple[str, ...],
    api_versions: tuple[str, ...],
    kube_version: str | None,
    chart: Path = CHART,
    show_only: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    cmd = [helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE]
    with tempfile.TemporaryDirectory() as tmp:
        for i, doc in enumerate(values):
            path = Path(tmp) / f"values-{i}.yaml"
            path.write_text(doc)
            cmd += ["-f", str(path)]
        for api in api_versions:
            cmd += ["--api-versions", api]
        if kube_version:
            cmd += ["--kube-version", kube_version]
        for template in show_only:
            cmd += ["--show-only", template]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@functools.lru_cache(maxsize=256)
def _render_cached(helm: str, values: tuple[str, ...], api_versions: tuple[str, ...], kube_version: str | None) -> Rendered:
    proc = _run_helm(helm, values, api_versions, kube_version)
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed:\n{proc.stderr}")
    docs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    return Rendered(docs=docs, text=proc.stdout)


def _values_docs(files: tuple[Path, ...], overrides: tuple[Mapping[str, Any], ...]) -> tuple[str, ...]:
    return tuple(f.read_text() for f in files) + tuple(yaml.safe_dump(dict(o)) for o in overrides)


def merged_values(files: tuple[Path, ...], overrides: tuple[Mapping[str, Any], ...]) -> dict[str, Any]:
    """What the given files and overrides set (not the chart defaults), merged as helm merges them."""
    out: dict[str, Any] = {}
    for doc in [yaml.safe_load(f.read_text()) or {} for f in files] + [dict(o) for o in overrides]:
        _deep_merge(out, doc)
    return out


def _deep_merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


def render(
    helm: str,
    *overrides: Mapping[str, Any],
    files: tuple[Path, ...] = (),
    api_versions: tuple[str, ...] | None = None,
    kube_version: str | None = None,
) -> Rendered:
    """Render the chart with values files and override dicts. KEDA's API is offered when KEDA is enabled,
    prometheus-operator's when the ServiceMonitor is."""
    if api_versions is None:
        api_versions = apis_wanted(merged_values(files, overrides))
    return _render_cached(helm, _values_docs(files, overrides), tuple(api_versions), kube_version)


def render_error(
    helm: str, *overrides: Mapping[str, Any], files: tuple[Path, ...] = (), api_versions: tuple[str, ...] = ()
) -> str:
    """Render values that must be refused; returns helm's error output."""
    proc = _run_helm(helm, _values_docs(files, overrides), api_versions, None)
    assert proc.returncode != 0, "helm template accepted values that it should refuse"
    return proc.stderr


def render_notes(helm: str, *overrides: Mapping[str, Any], files: tuple[Path, ...] = ()) -> str:
    """NOTES.txt as `helm install` would print it (helm template does not print notes, so a copy of
    the chart renders NOTES.txt through tpl in an extra template)."""
    with tempfile.TemporaryDirectory() as tmp:
        chart = Path(tmp) / "assayer"
        shutil.copytree(CHART, chart)
        shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes-under-test.txt")
        (chart / "templates" / "zz-notes-under-test.yaml").write_text(
            'notes: {{ tpl (.Files.Get "notes-under-test.txt") . | toJson }}\n'
        )
        values = _values_docs(files, overrides)
        api = apis_wanted(merged_values(files, overrides))
        proc = _run_helm(helm, values, api, None, chart=chart, show_only=("templates/zz-notes-under-test.yaml",))
    assert proc.returncode == 0, proc.stderr
    return str(yaml.safe_load(proc.stdout)["notes"])


def walk_strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from walk_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk_strings(v)
    elif obj is not None:
        yield str(obj)
