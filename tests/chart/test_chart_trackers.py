"""Trackers (issue #12): results delivered to TensorBoard, MLflow and W&B by the watch workers.
Their settings reach the watch pods only, the W&B API key only through a Secret, and values that
could not deliver are refused."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import yaml
from chartlib import CHART, CI_VALUES_DIR, FULLNAME, Rendered, containers, env_of, mounts_of, render, render_error, volumes_of

pytestmark = pytest.mark.chart

WATCH = f"{FULLNAME}-watch"
EVAL = f"{FULLNAME}-eval"
TRACKERS_SECRET = f"{FULLNAME}-trackers"
WATCH_KEYS = {"name": "a", "directory": "a", "evaluator": "m:f"}
API_KEY = "wandb-key-sentinel-0123456789abcdef"

TRACKER_VARIABLES = {
    "ASSAYER_REPORT_TO",
    "ASSAYER_DELIVERY_LEASE",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_MODE",
    "WANDB_API_KEY",
}

ALL_SET = {
    "trackers": {
        "reportTo": "tensorboard,mlflow,wandb",
        "deliveryLease": 90,
        "mlflow": {"trackingUri": "http://mlflow.mlflow:5000", "experimentName": "evals"},
        "wandb": {
            "project": "llm-evals",
            "entity": "my-team",
            "mode": "online",
            "existingSecret": "wandb",
            "existingSecretKey": "api-key",
        },
    }
}


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (only,) = containers(obj)
    return only


def watch_env(r: Rendered) -> dict[str, dict[str, Any]]:
    return env_of(container(r.get("Deployment", WATCH)))


def tracker_env(env: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in env.items() if k in TRACKER_VARIABLES}


def test_tracker_settings_reach_the_watch_container_exactly(helm: str) -> None:
    env = tracker_env(watch_env(render(helm, ALL_SET)))
    assert {k: e.get("value") for k, e in env.items() if k != "WANDB_API_KEY"} == {
        "ASSAYER_REPORT_TO": "tensorboard,mlflow,wandb",
        "ASSAYER_DELIVERY_LEASE": "90",
        "MLFLOW_TRACKING_URI": "http://mlflow.mlflow:5000",
        "MLFLOW_EXPERIMENT_NAME": "evals",
        "WANDB_PROJECT": "llm-evals",
        "WANDB_ENTITY": "my-team",
        "WANDB_MODE": "online",
    }
    assert env["WANDB_API_KEY"] == {
        "name": "WANDB_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}},
    }


def test_eval_and_other_pods_get_no_tracker_settings(helm: str) -> None:
    r = render(helm, ALL_SET, {"trackers": {"wandb": {"existingSecret": "", "apiKey": API_KEY}}})
    for obj in r.workloads():
        if obj["metadata"]["name"] == WATCH:
            continue
        for c in containers(obj):
            leaked = {e["name"] for e in c.get("env", [])} & TRACKER_VARIABLES
            assert leaked == set(), f"{obj['metadata']['name']}/{c['name']}: {sorted(leaked)}"
            assert not any(e["name"].startswith(("WANDB_", "MLFLOW_")) for e in c.get("env", []))
    for cm in r.of_kind("ConfigMap"):
        assert not set(cm.get("data", {})) & TRACKER_VARIABLES, cm["metadata"]["name"]
    # ...so that the eval workers, which run user code, never hold the key
    assert API_KEY not in json.dumps(r.get("Deployment", EVAL))


def test_only_set_values_become_variables(helm: str) -> None:
    """Defaults: the lease only (always set); no empty MLFLOW_*/WANDB_* variable shadows a tracker's default."""
    env = tracker_env(watch_env(render(helm)))
    assert env == {"ASSAYER_DELIVERY_LEASE": {"name": "ASSAYER_DELIVERY_LEASE", "value": "120"}}
    env = tracker_env(watch_env(render(helm, {"trackers": {"mlflow": {"trackingUri": "http://m:5000"}}})))
    assert set(env) == {"ASSAYER_DELIVERY_LEASE", "MLFLOW_TRACKING_URI"}
    assert render(helm).find("Secret", TRACKERS_SECRET) is None


def test_an_api_key_in_values_goes_into_the_charts_secret(helm: str) -> None:
    r = render(helm, {"trackers": {"reportTo": "wandb", "wandb": {"apiKey": API_KEY}}})
    assert r.secret_value(TRACKERS_SECRET, "wandb-api-key") == API_KEY
    assert watch_env(r)["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": TRACKERS_SECRET, "key": "wandb-api-key"}
    for obj in r.docs:
        if obj["kind"] != "Secret":
            assert API_KEY not in json.dumps(obj), f"{obj['kind']}/{obj['metadata']['name']} holds the key"


def test_an_existing_secret_is_used_with_its_default_key(helm: str) -> None:
    r = render(helm, {"trackers": {"reportTo": "wandb", "wandb": {"existingSecret": "team-wandb"}}})
    assert watch_env(r)["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "team-wandb", "key": "WANDB_API_KEY"}
    assert r.find("Secret", TRACKERS_SECRET) is None


def test_report_to_and_per_watch_options_reach_the_watches_file(helm: str) -> None:
    watch = {
        **WATCH_KEYS,
        "report_to": ["tensorboard", "mlflow", "wandb"],
        "tensorboard_dir": "/results/tb/a",
        "mlflow_run_id": "0123abcd",
        "wandb_run_id": "1a2b3c4d",
    }
    r = render(helm, {"watches": [watch], "trackers": {"wandb": {"mode": "offline"}}})
    data = yaml.safe_load(r.get("ConfigMap", f"{FULLNAME}-watches")["data"]["watches.yaml"])
    (entry,) = data["watches"]
    assert entry["report_to"] == ["tensorboard", "mlflow", "wandb"]
    assert (entry["tensorboard_dir"], entry["mlflow_run_id"], entry["wandb_run_id"]) == ("/results/tb/a", "0123abcd", "1a2b3c4d")


def test_the_watches_file_passes_assayers_own_check_of_report_to(helm: str) -> None:
    """The keys the chart writes are the ones the watches-file reader accepts."""
    from assayer import watches
    r = render(helm, {"watches": [{**WATCH_KEYS, "report_to": ["mlflow"], "mlflow_run_id": "r"}]})
    entry = yaml.safe_load(r.get("ConfigMap", f"{FULLNAME}-watches")["data"]["watches.yaml"])["watches"][0]
    assert watches.Report(entry["report_to"], None, entry["mlflow_run_id"], None).check() == ["mlflow"]


def test_watch_pods_mount_results_only_for_tensorboard_there(helm: str) -> None:
    def mounts(values: dict[str, Any]) -> dict[str, Any]:
        return mounts_of(container(render(helm, values).get("Deployment", WATCH)))

    assert "results" not in mounts({})
    assert "results" not in mounts({"trackers": {"reportTo": "mlflow"}})
    r = render(helm, {"trackers": {"reportTo": "mlflow, tensorboard"}})
    assert mounts_of(container(r.get("Deployment", WATCH)))["results"] == {"name": "results", "mountPath": "/results"}
    assert volumes_of(r.get("Deployment", WATCH))["results"] == volumes_of(r.get("Deployment", EVAL))["results"]
    assert "results" in mounts({"watches": [{**WATCH_KEYS, "report_to": ["tensorboard"]}]})
    # a watch with its own TensorBoard directory does not write under results
    own_dir = {**WATCH_KEYS, "report_to": ["tensorboard"], "tensorboard_dir": "/tb/a"}
    assert "results" not in mounts({"watches": [own_dir]})


def test_trackers_ci_case_is_complete() -> None:
    """ci/trackers-values.yaml (rendered, validated and scanned with every case) sets every tracker key."""
    case = yaml.safe_load((CI_VALUES_DIR / "trackers-values.yaml").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["trackers"]
    assert set(case["trackers"]) == set(defaults)
    assert any(w.get("report_to") for w in case["watches"])


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    (
        "wandb-online-without-key",
        {"trackers": {"reportTo": "wandb"}},
        "trackers.wandb.mode is empty (online), but there is no API key",
    ),
    (
        "wandb-in-a-watch-online-without-key",
        {"watches": [{**WATCH_KEYS, "report_to": ["wandb"]}], "trackers": {"wandb": {"mode": "online"}}},
        "trackers.wandb.mode is online, but there is no API key",
    ),
    (
        "wandb-disabled",
        {"trackers": {"reportTo": "wandb", "wandb": {"mode": "disabled"}}},
        "trackers.wandb.mode is disabled but W&B is in trackers.reportTo or a watch's report_to",
    ),
    (
        "wandb-key-twice",
        {"trackers": {"wandb": {"apiKey": "k", "existingSecret": "s"}}},
        "trackers.wandb.apiKey and trackers.wandb.existingSecret are both set",
    ),
    (
        "run-id-without-its-tracker",
        {"watches": [{**WATCH_KEYS, "report_to": ["tensorboard"], "mlflow_run_id": "r"}]},
        "watches[0].mlflow_run_id is set but mlflow is not in its report_to",
    ),
    (
        "tensorboard-dir-without-reportto-default",
        {"watches": [{**WATCH_KEYS, "tensorboard_dir": "/results/a"}], "trackers": {"reportTo": "mlflow"}},
        "watches[0].tensorboard_dir is set but tensorboard is not in its report_to",
    ),
    (
        "tensorboard-on-a-rwo-results-claim",
        {"trackers": {"reportTo": "tensorboard"}, "results": {"persistence": {"accessMode": "ReadWriteOnce"}}},
        "TensorBoard makes the watch pods write results beside the eval pods",
    ),
]


@pytest.mark.parametrize(("values", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_trackers_that_could_not_deliver_are_refused(helm: str, values: dict[str, Any], message: str) -> None:
    error = render_error(helm, values)
    assert message in error
    assert "assayer: invalid values (1 problem):" in error


def test_valid_neighbours_of_the_refused_trackers_render(helm: str) -> None:
    render(helm, {"trackers": {"reportTo": "wandb", "wandb": {"mode": "offline"}}})
    render(helm, {"trackers": {"reportTo": "wandb", "wandb": {"existingSecret": "s"}}})
    render(helm, {"trackers": {"wandb": {"mode": "disabled"}}})  # disabled is fine while no watch uses W&B
    render(helm, {"watches": [{**WATCH_KEYS, "mlflow_run_id": "r"}], "trackers": {"reportTo": "mlflow"}})
    render(helm, {"trackers": {"reportTo": "tensorboard"}, "watch": {"replicas": 0},
                  "results": {"persistence": {"accessMode": "ReadWriteOnce"}}})


SCHEMA_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown-tracker-in-a-watch", {"watches": [{**WATCH_KEYS, "report_to": ["neptune"]}]}, "report_to"),
    ("report-to-as-a-string", {"watches": [{**WATCH_KEYS, "report_to": "tensorboard"}]}, "report_to"),
    ("unknown-tracker-by-default", {"trackers": {"reportTo": "tensorboard,neptune"}}, "reportTo"),
    ("bad-wandb-mode", {"trackers": {"wandb": {"mode": "dryrun"}}}, "mode"),
    ("unknown-tracker-key", {"trackers": {"wandb": {"apiKeySecret": "s"}}}, "apiKeySecret"),
    ("lease-zero", {"trackers": {"deliveryLease": 0}}, "deliveryLease"),
    ("relative-tensorboard-dir", {"watches": [{**WATCH_KEYS, "report_to": ["tensorboard"], "tensorboard_dir": "tb"}]},
     "tensorboard_dir"),
]


@pytest.mark.parametrize(("values", "needle"), [c[1:] for c in SCHEMA_ERRORS], ids=[c[0] for c in SCHEMA_ERRORS])
def test_schema_refuses_bad_tracker_values(helm: str, values: dict[str, Any], needle: str) -> None:
    error = render_error(helm, values)
    assert "values don't meet the specifications of the schema" in error
    assert needle in error


def test_schema_refuses_a_bad_report_to_offline() -> None:
    """The same refusal without helm: the schema itself."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    validator = jsonschema.Draft7Validator(schema)
    values["watches"] = [{**WATCH_KEYS, "report_to": ["tensorboard", "mlflow", "wandb"]}]
    assert list(validator.iter_errors(values)) == []
    values["watches"] = [{**WATCH_KEYS, "report_to": ["tensorboard", "comet"]}]
    errors = list(validator.iter_errors(values))
    assert [list(e.absolute_path) for e in errors] == [["watches", 0, "report_to", 1]]
