"""Snapshots (--snapshot): one claim that the watch pods write pins to and every eval pod reads
at the same path, with the checkpoints still read-only; nothing of it while snapshots are off."""

from __future__ import annotations

from typing import Any

import pytest
from chartlib import CI_VALUES_DIR, FULLNAME, containers, env_of, mounts_of, render, volumes_of

pytestmark = pytest.mark.chart

SNAPSHOTS_CASE = (CI_VALUES_DIR / "snapshots-values.yaml",)
CLAIM = f"{FULLNAME}-snapshots"
WATCH = f"{FULLNAME}-watch"


def worker_deployments(r: Any) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d
        for d in r.of_kind("Deployment")
        if d["metadata"]["name"] == WATCH or d["metadata"]["name"].startswith(f"{FULLNAME}-eval")
    }


def test_the_watch_pods_write_snapshots_and_every_eval_pod_only_reads_them(helm: str) -> None:
    r = render(helm, files=SNAPSHOTS_CASE)
    deployments = worker_deployments(r)
    assert {WATCH, f"{FULLNAME}-eval", f"{FULLNAME}-eval-large"} <= set(deployments)
    for name, deployment in deployments.items():
        (container,) = containers(deployment)
        mount = mounts_of(container)["snapshots"]
        assert mount["mountPath"] == "/snapshots", name
        assert bool(mount.get("readOnly")) == (name != WATCH), name
        assert volumes_of(deployment)["snapshots"] == {"name": "snapshots", "persistentVolumeClaim": {"claimName": CLAIM}}
        # The checkpoints stay read-only: pins are copies, never links made through a writable mount.
        assert mounts_of(container)["checkpoints"]["readOnly"] is True, name


def test_snapshot_settings_reach_every_worker_through_the_config(helm: str) -> None:
    r = render(helm, files=SNAPSHOTS_CASE)
    config = r.config()
    assert (config["ASSAYER_SNAPSHOT"], config["ASSAYER_SNAPSHOT_DIR"], config["ASSAYER_SNAPSHOT_MAX_GB"]) == (
        "auto", "/snapshots", "20")
    for name, deployment in worker_deployments(r).items():
        (container,) = containers(deployment)
        assert not {"ASSAYER_SNAPSHOT", "ASSAYER_SNAPSHOT_DIR"} & set(env_of(container)), f"{name} overrides the config"


def test_the_chart_makes_a_read_write_many_claim_of_the_given_size(helm: str) -> None:
    claim = render(helm, files=SNAPSHOTS_CASE).get("PersistentVolumeClaim", CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "25Gi"


def test_an_existing_claim_is_mounted_and_none_is_made(helm: str) -> None:
    r = render(helm, {"snapshots": {"enabled": True, "existingClaim": "pins", "persistence": {"enabled": False}}})
    assert r.find("PersistentVolumeClaim", CLAIM) is None
    for deployment in worker_deployments(r).values():
        assert volumes_of(deployment)["snapshots"]["persistentVolumeClaim"] == {"claimName": "pins"}


def test_snapshots_are_off_by_default(helm: str) -> None:
    r = render(helm)
    assert r.find("PersistentVolumeClaim", CLAIM) is None
    assert not {k for k in r.config() if k.startswith("ASSAYER_SNAPSHOT")}
    for deployment in worker_deployments(r).values():
        assert "snapshots" not in volumes_of(deployment)
