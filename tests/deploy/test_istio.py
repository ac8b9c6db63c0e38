"""deploy/istio: the Istio recipe rendered by kustomize, the Kubernetes kinds validated against the
API schemas (kubernetes-validate, strict), the Istio kinds and the mesh config against strict
subset schemas in deploy/istio/schemas (kubernetes-validate has no CRD schemas), and every name
tied to the service's real settings and to the other manifests. The sidecars themselves run
through the real Envoy in tests/integration/test_mesh.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from iam_grpc.config import load_settings
from tests.deploy.test_kubernetes import render, schema_problems

ROOT = Path(__file__).resolve().parents[2]
ISTIO = ROOT / "deploy" / "istio"
ISTIO_KINDS = {
    "AuthorizationPolicy": "authorizationpolicy-security-v1.json",
    "RequestAuthentication": "requestauthentication-security-v1.json",
    "IstioOperator": "istiooperator-meshconfig.json",
}


def istio_problems(doc: dict[str, Any]) -> list[str]:
    schema = json.loads((ISTIO / "schemas" / ISTIO_KINDS[doc["kind"]]).read_text())
    return [error.message for error in jsonschema.Draft202012Validator(schema).iter_errors(doc)]


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render(ISTIO)


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}"
    return found[0]


def mesh_provider() -> dict[str, Any]:
    mesh = yaml.safe_load((ISTIO / "mesh-config.yaml").read_text())
    [provider] = mesh["spec"]["meshConfig"]["extensionProviders"]
    return dict(provider)


def test_every_document_validates(docs: list[dict[str, Any]]) -> None:
    """Kubernetes kinds against the API schemas, Istio kinds against their subset schemas."""
    assert {"RequestAuthentication", "AuthorizationPolicy", "Deployment"} <= {d["kind"] for d in docs}
    for doc in docs:
        problems = istio_problems(doc) if doc["kind"] in ISTIO_KINDS else schema_problems(doc)
        assert problems == [], f"{doc['kind']}/{doc['metadata']['name']}"
    assert istio_problems(yaml.safe_load((ISTIO / "mesh-config.yaml").read_text())) == []


def test_the_istio_check_catches_a_misspelt_field_or_value(docs: list[dict[str, Any]]) -> None:
    """The check can fail: an unknown field, a wrong action, CUSTOM without a provider."""
    policy = copy.deepcopy(one(docs, "AuthorizationPolicy"))
    policy["spec"]["provider"]["nmae"] = "iam-grpc"
    assert istio_problems(policy)
    policy = copy.deepcopy(one(docs, "AuthorizationPolicy"))
    policy["spec"]["action"] = "EXTERNAL"
    assert istio_problems(policy)
    policy = copy.deepcopy(one(docs, "AuthorizationPolicy"))
    del policy["spec"]["provider"]
    assert istio_problems(policy)
    mesh = yaml.safe_load((ISTIO / "mesh-config.yaml").read_text())
    mesh["spec"]["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"]["port"] = "50051"
    assert istio_problems(mesh)
    auth = copy.deepcopy(one(docs, "RequestAuthentication"))
    auth["spec"]["jwtRules"][0]["jwks_uri"] = auth["spec"]["jwtRules"][0].pop("jwksUri")
    assert istio_problems(auth)


def test_request_authentication_uses_the_ops_jwks_and_the_tokens_settings(docs: list[dict[str, Any]]) -> None:
    """jwksUri is the ops Service's /.well-known/jwks.json; issuer and audience are the service's
    defaults; the token is kept for the ext_authz check."""
    [rule] = one(docs, "RequestAuthentication")["spec"]["jwtRules"]
    ops = one(docs, "Service", "iam-grpc-ops")
    [port] = ops["spec"]["ports"]
    namespace = ops["metadata"]["namespace"]
    assert rule["jwksUri"] == (
        f"http://iam-grpc-ops.{namespace}.svc.cluster.local:{port['port']}/.well-known/jwks.json"
    )
    tokens = load_settings(environ={}).tokens
    assert (rule["issuer"], rule["audiences"]) == (tokens.issuer, [tokens.audience])
    assert rule["forwardOriginalToken"] is True


def test_the_custom_policy_and_the_extension_provider_agree(docs: list[dict[str, Any]]) -> None:
    """CUSTOM with the mesh's provider, over the same workload as the RequestAuthentication; the
    provider names the gRPC Service and port, and fails closed."""
    policy = one(docs, "AuthorizationPolicy")["spec"]
    provider = mesh_provider()
    assert policy["action"] == "CUSTOM"
    assert policy["provider"]["name"] == provider["name"]
    assert policy["selector"] == one(docs, "RequestAuthentication")["spec"]["selector"]
    grpc_service = one(docs, "Service", "iam-grpc")
    [port] = grpc_service["spec"]["ports"]
    ext = provider["envoyExtAuthzGrpc"]
    assert ext["service"] == f"iam-grpc.{grpc_service['metadata']['namespace']}.svc.cluster.local"
    assert ext["port"] == port["port"]
    assert ext["failOpen"] is False


def test_the_service_trusts_the_sidecar_and_knows_the_workload(docs: list[dict[str, Any]]) -> None:
    """The Deployment's environment loads: 127.0.0.6 is a trusted proxy, and the SPIFFE id of the
    policy's namespace (service account frontend) is a caller allowed Check and nothing else."""
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "true"
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("IAM_CALLERS__")}
    callers = load_settings(environ={k: v for k, v in env.items() if not k.endswith("_FILE")}).callers
    assert [str(n) for n in callers.trusted_proxies] == ["127.0.0.6/32"]
    namespace = one(docs, "AuthorizationPolicy")["metadata"]["namespace"]
    frontend = callers.entries["frontend"]
    assert frontend.spiffe_ids == [f"spiffe://cluster.local/ns/{namespace}/sa/frontend"]
    assert frontend.methods == ["envoy.service.auth.v3.Authorization/Check"]


def test_the_sidecar_can_reach_istiod(docs: list[dict[str, Any]]) -> None:
    """The production NetworkPolicies limit egress; the recipe adds istiod's port for the sidecar."""
    policy = one(docs, "NetworkPolicy", "iam-grpc-istiod")
    assert policy["spec"]["podSelector"] == one(docs, "NetworkPolicy", "iam-grpc")["spec"]["podSelector"]
    assert policy["spec"]["egress"][0]["ports"] == [{"port": 15012, "protocol": "TCP"}]
