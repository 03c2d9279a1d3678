"""The Kubernetes manifests render and pass `make k8s-check` (kubectl kustomize + schemas + our rules)."""

from __future__ import annotations

import copy
import importlib.util
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")

spec = importlib.util.spec_from_file_location("k8s_check", Path(__file__).resolve().parents[1] / "k8s" / "check.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


def test_every_overlay_passes() -> None:
    assert check.main() == 0


def test_the_rules_catch_what_they_claim_to() -> None:
    triton = next(o for o in check.render("raw") if o["kind"] == "Deployment" and o["metadata"]["name"] == "triton")
    container = triton["spec"]["template"]["spec"]["containers"][0]
    assert check.container_problems("x", container, triton["spec"]["template"]["spec"]["securityContext"]) == []
    broken = copy.deepcopy(container)
    broken["image"] = "nvcr.io/nvidia/tritonserver:latest"
    del broken["livenessProbe"], broken["resources"]["limits"]
    broken["securityContext"]["readOnlyRootFilesystem"] = False
    problems = "\n".join(check.container_problems("x", broken, {}))
    for expected in ("no limits.cpu", "no livenessProbe", "runAsNonRoot", "root filesystem is writable", ":latest"):
        assert expected in problems
    bogus = copy.deepcopy(triton)
    bogus["spec"]["replicaz"] = 3
    assert check.core_problems(bogus, "x"), "strict schema validation must reject unknown fields"


def test_the_predictor_address_check_models_kserves_service_rule() -> None:
    objects = check.render("kserve")
    assert check.predictor_address_problems(objects) == []
    runtime = next(o for o in objects if o["kind"] == "ServingRuntime")
    # The manifest before: only Triton's gRPC port declared, so the Service's port 80 reached gRPC.
    runtime["spec"]["containers"][0]["ports"] = [{"name": "h2c", "containerPort": 9000, "protocol": "TCP"}]
    (problem,) = check.predictor_address_problems(objects)
    assert "first declared port (9000), not Triton's HTTP port 8080" in problem
    runtime["spec"]["containers"][0]["ports"] = [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    isvc = next(o for o in objects if o["kind"] == "InferenceService")
    args = next(c for c in isvc["spec"]["transformer"]["containers"] if c["name"] == "retriever")["args"]
    args[:] = [a for a in args if not a.startswith("--predictor_host")] + [
        "--predictor_host=hm-recommender-predictor:8000"
    ]
    assert "port 80 only" in check.predictor_address_problems(objects)[0]


def test_the_admission_proxy_is_in_the_request_path_of_every_overlay() -> None:
    for overlay in ("raw", "kserve"):
        objects = check.render(overlay)
        assert any("haproxy" in c.get("image", "") for o in objects for c, _ in check.containers(o)), overlay
        assert check.admission_proxy_problems(objects) == [], overlay
    objects = check.render("kserve")
    transformer = next(o for o in objects if o["kind"] == "InferenceService")["spec"]["transformer"]
    proxy, retriever = transformer["containers"]
    # The manifest before: the retriever first, so KServe's Service bypassed any proxy beside it.
    transformer["containers"] = [retriever, proxy]
    assert "not the admission proxy's 8080" in check.admission_proxy_problems(objects)[0]
    transformer["containers"] = [proxy, retriever]
    del proxy["command"]  # KServe's appended flags would reach haproxy itself
    assert "needs a `command`" in check.admission_proxy_problems(objects)[0]
    proxy["command"] = ["/bin/sh"]
    proxy["env"] = [{"name": "PROXY_BIND", "value": ":8080"}]  # the retriever address left at the default 8080
    assert "sends to port 8080, the retriever listens on 8081" in check.admission_proxy_problems(objects)[0]


def test_only_jobs_write_the_artifacts_volume() -> None:
    objects = check.render("raw")
    assert check.artifacts_access_problems(objects) == []
    jobs = [o for d in ("../jobs", "../jobs/publish", "../jobs/embed", "../jobs/embed/update") for o in check.render(d)]
    assert {o["metadata"]["name"] for o in jobs if o["kind"] == "Job"} == {
        "publish-artifacts",
        "catalogue-update",
        "catalogue-embed",
        "catalogue-update-from-shards",
    }
    assert check.artifacts_access_problems(jobs) == []  # Jobs may write
    triton = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "triton")
    for mount in triton["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]:
        mount.pop("readOnly", None)
    assert check.artifacts_access_problems(objects) == ["Deployment/triton: mounts the artifacts volume writable"]
    pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes: the Jobs write, the servers read


def test_gpu_only_where_intended() -> None:
    assert check.requests_gpu(check.render("raw")) and check.requests_gpu(check.render("kserve"))
    assert not check.requests_gpu(check.render("cpu"))


def test_custom_resources_are_checked_against_their_published_schemas() -> None:
    objects = {o["kind"]: o for o in check.render("kserve")}
    for kind in ("InferenceService", "ServingRuntime", "PodMonitor", "PrometheusRule"):
        assert check.custom_resource_problems(objects[kind], kind) == [], kind
    isvc = copy.deepcopy(objects["InferenceService"])
    isvc["spec"]["predictor"]["modle"] = {}
    isvc["spec"]["transformer"]["containers"][0]["imagePullPolicy"] = 3
    problems = "\n".join(check.custom_resource_problems(isvc, "x"))
    assert "unknown field 'modle'" in problems and "imagePullPolicy: expected str" in problems
    runtime = copy.deepcopy(objects["ServingRuntime"])
    runtime["spec"]["supportedModelFormats"] = "pytorch"
    assert "expected a list" in "\n".join(check.custom_resource_problems(runtime, "x"))
    monitor = copy.deepcopy(objects["PodMonitor"])
    monitor["spec"]["podMetricsEndpoints"][0]["pathh"] = "/metrics"
    assert "unknown field 'pathh'" in "\n".join(check.custom_resource_problems(monitor, "x"))
    rule = copy.deepcopy(objects["PrometheusRule"])
    rule["spec"]["groups"][0]["rules"] = "not a list"
    assert check.custom_resource_problems(rule, "x")


def test_serving_containers_wait_for_the_endpoints_before_sigterm() -> None:
    objects = check.render("raw")
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "retriever")
    assert check.termination_problems(deployment, "x") == []
    pod = deployment["spec"]["template"]["spec"]
    pod["terminationGracePeriodSeconds"] = 5
    assert "not inside the 5 s grace period" in check.termination_problems(deployment, "x")[0]
    del pod["containers"][1]["lifecycle"]
    assert "container admission-proxy: no preStop sleep" in "\n".join(check.termination_problems(deployment, "x"))
    isvc = next(o for o in check.render("kserve") if o["kind"] == "InferenceService")
    assert check.termination_problems(isvc, "x") == []


def test_the_retriever_scales_on_its_request_rate() -> None:
    for overlay in ("raw", "cpu"):
        objects = check.render(overlay)
        (scaler,) = [o for o in objects if o["kind"] == "ScaledObject"]
        assert scaler["spec"]["scaleTargetRef"]["name"] == "retriever"
        assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]  # KEDA makes its own
        # counted by the admission sidecar, which sees the requests it refuses
        assert "haproxy_frontend_http_requests_total" in scaler["spec"]["triggers"][0]["metadata"]["query"]
        assert check.custom_resource_problems(scaler, "x") == [] and check.autoscaling_problems(objects) == []
    bogus = copy.deepcopy(scaler)
    bogus["spec"]["triggers"][0]["metadataa"] = {}
    assert "unknown field 'metadataa'" in "\n".join(check.custom_resource_problems(bogus, "x"))
    isvc = next(o for o in check.render("kserve") if o["kind"] == "InferenceService")
    metric = isvc["spec"]["transformer"]["autoScaling"]["metrics"][0]["external"]["metric"]
    assert "haproxy_frontend_http_requests_total" in metric["query"] and check.custom_resource_problems(isvc, "x") == []


def test_the_autoscaling_checks_model_what_keda_and_kserve_refuse() -> None:
    objects = check.render("raw")
    scaler = next(o for o in objects if o["kind"] == "ScaledObject")
    # an HPA left beside the ScaledObject (the manifest before): two autoscalers on one Deployment
    hpa = {
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "retriever"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "retriever"}},
    }
    (problem,) = check.autoscaling_problems([*objects, hpa])
    assert "Deployment/retriever is already scaled by ScaledObject/retriever" in problem
    scaler["spec"]["fallback"] = {"failureThreshold": 3, "replicas": 4}
    assert "fallback with a cpu trigger" in "\n".join(check.autoscaling_problems(objects))
    del scaler["spec"]["fallback"]
    scaler["spec"]["scaleTargetRef"]["name"] = "retreiver"
    assert "does not deploy" in "\n".join(check.autoscaling_problems(objects))
    isvc = next(o for o in check.render("kserve") if o["kind"] == "InferenceService")
    assert check.autoscaling_problems([isvc]) == []
    del isvc["spec"]["transformer"]["annotations"]["serving.kserve.io/autoscalerClass"]
    assert "autoscalerClass is not keda" in check.autoscaling_problems([isvc])[0]


def test_every_query_names_a_metric_the_retriever_exports() -> None:
    for overlay in ("kserve", "raw"):
        assert check.metric_name_problems(check.render(overlay)) == []
    objects = check.render("raw")
    scaler = next(o for o in objects if o["kind"] == "ScaledObject")
    scaler["spec"]["triggers"][0]["metadata"]["query"] = "sum(rate(retriever_http_requests_total[1m]))"
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["expr"] = "histogram_quantile(0.99, rate(retriever_latency_bucket[5m])) > 1"
    problems = "\n".join(check.metric_name_problems(objects))
    assert "ScaledObject/retriever trigger: retriever_http_requests_total is not" in problems
    assert "retriever_latency_bucket is not" in problems
