"""deploy/kubernetes: the core objects validate against the Kubernetes schemas (kubernetes-validate, offline,
strict: an unknown field fails), and the objects agree with each other and with the server (selectors,
ports, probes on its endpoints, a grace period that covers the drain, metrics it serves). The Inference
Extension's objects have no schema there: their fields are checked here."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

KUBERNETES = ROOT / "deploy" / "kubernetes"
VERSION = "1.33.0"  # the oldest Kubernetes still supported upstream when this was written


def documents(name: str) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((KUBERNETES / name).read_text())}


CORE = documents("trickle.yaml")
POOL = documents("inference-pool.yaml")


@pytest.mark.parametrize("kind", sorted(CORE))
def test_each_core_object_validates_against_the_kubernetes_schema(kind: str) -> None:
    assert kubernetes_validate.validate(CORE[kind], VERSION, strict=True)


def test_the_validation_is_strict_an_unknown_field_fails() -> None:
    wrong = copy.deepcopy(CORE["Deployment"])
    wrong["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, VERSION, strict=True)


def container() -> dict[str, Any]:
    return CORE["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def flag(name: str) -> str:
    args = container()["args"]
    return str(args[args.index(name) + 1])


def test_the_pod_probes_the_servers_endpoints_and_waits_out_its_drain() -> None:
    pod = CORE["Deployment"]["spec"]["template"]["spec"]
    main = container()
    assert main["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert main["livenessProbe"]["httpGet"]["path"] == "/health"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    port = next(p for p in main["ports"] if p["name"] == "http")["containerPort"]
    assert int(flag("--port")) == port and flag("--host") == "0.0.0.0"
    pre_stop = main["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(flag("--drain-timeout"))
    strategy = CORE["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def test_every_selector_picks_the_pods_and_the_autoscaler_reads_a_metric_trickle_serves() -> None:
    labels = CORE["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert CORE["Deployment"]["spec"]["selector"]["matchLabels"] == labels
    assert CORE["Service"]["spec"]["selector"] == labels
    assert CORE["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    assert POOL["InferencePool"]["spec"]["selector"]["matchLabels"] == labels
    target = CORE["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", CORE["Deployment"]["metadata"]["name"])
    (metric,) = CORE["HorizontalPodAutoscaler"]["spec"]["metrics"]
    from trickle.generation.metrics import PREFIX

    # The adapter's rule (in the manifest's comment) renames trickle:<name> to trickle_<name>.
    assert metric["pods"]["metric"]["name"] == f"{PREFIX.rstrip(':')}_num_requests_waiting"


def test_the_inference_pool_targets_the_servers_port_and_the_route_never_times_a_stream_out() -> None:
    pool = POOL["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    port = next(p for p in container()["ports"] if p["name"] == "http")["containerPort"]
    assert pool["spec"]["targetPorts"] == [{"number": port}]
    assert {"name", "port"} <= set(pool["spec"]["endpointPickerRef"])
    (rule,) = POOL["HTTPRoute"]["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        "inference.networking.k8s.io",
        "InferencePool",
        pool["metadata"]["name"],
    )
    assert rule["timeouts"]["request"] == "0s"
