"""`make k8s-check`: render every overlay and check what comes out, without a cluster.

1. `kubectl kustomize k8s/overlays/<name>` for each overlay, and k8s/jobs;
2. every core object validated (strict) against the Kubernetes OpenAPI schemas shipped in
   `kubernetes-validate`; every custom resource against its project's published schema, pinned by
   package version: InferenceService/ServingRuntime through the KServe SDK's models (generated from
   KServe's OpenAPI spec; pod fields through the Kubernetes client's models), PodMonitor /
   ServiceMonitor / PrometheusRule / ScaledObject through cloudcoil's models generated from
   prometheus-operator's and KEDA's CRDs; unknown fields and wrong types are problems;
3. our own rules on every container: requests and limits, readiness and liveness probes, non-root,
   read-only root filesystem, no privilege escalation, all capabilities dropped, pinned image tags;
   every serving container (Deployment, ServingRuntime, InferenceService) waits in a preStop sleep shorter
   than its grace period, so that SIGTERM comes after the Service has stopped sending it connections;
   GPU overlays request a GPU and the cpu overlay and k8s/jobs do not; only Jobs mount the artifacts
   volume writable; the Grafana dashboard is valid JSON
   with a query in every panel; the alert rules pass `promtool check rules` where promtool exists;
4. the transformer -> predictor address as KServe's controller wires it (predictor_address_problems);
   autoscalers KEDA or KServe would refuse or ignore, or two on one workload (autoscaling_problems);
   every retriever_* metric an alert, dashboard panel or autoscaler queries is one the retriever
   exports (metric_name_problems).

Exit status 1 with one line per problem.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

K8S_DIR = Path(__file__).resolve().parent
# overlay -> must request a GPU (k8s/jobs: the artifacts volume's writers)
OVERLAYS = {
    "kserve": True,
    "raw": True,
    "cpu": False,
    "../jobs": False,
    "../jobs/publish": False,
    "../jobs/embed": False,
    "../jobs/embed/update": False,
}
KUBERNETES_VERSION = "1.32.0"
# kind -> (the cloudcoil module with its published CRD's models, the package to install); KServe's kinds
# are checked through the KServe SDK's OpenAPI models instead (KSERVE_MODELS)
CRD_MODELS = {
    "PodMonitor": ("cloudcoil.models.prometheus_operator.v1", "cloudcoil-models-prometheus-operator"),
    "ServiceMonitor": ("cloudcoil.models.prometheus_operator.v1", "cloudcoil-models-prometheus-operator"),
    "PrometheusRule": ("cloudcoil.models.prometheus_operator.v1", "cloudcoil-models-prometheus-operator"),
    "ScaledObject": ("cloudcoil.models.keda.v1alpha1", "cloudcoil-models-keda"),
}
CUSTOM_KINDS = {"InferenceService", "ServingRuntime", *CRD_MODELS}


def render(overlay: str) -> list[dict[str, Any]]:
    output = subprocess.run(
        ["kubectl", "kustomize", str(K8S_DIR / "overlays" / overlay)], capture_output=True, text=True, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def containers(obj: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(container, pod-level securityContext) for every container an object will run."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        pod = spec["template"]["spec"]
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            yield container, pod.get("securityContext", {})
    elif kind == "ServingRuntime":
        for container in spec.get("containers", []):
            yield container, {}
    elif kind == "InferenceService":
        for component in ("transformer", "explainer"):
            part = spec.get(component)
            for container in (part or {}).get("containers", []):
                yield container, part.get("securityContext", {})


def container_problems(
    where: str, container: dict[str, Any], pod_security: dict[str, Any], serves: bool = True
) -> list[str]:
    """Our rules for one container; `serves` = false for a Job's (it runs to completion: no probes)."""
    problems = []
    name = f"{where} container {container.get('name')}"
    resources = container.get("resources", {})
    for part in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(part, {}):
                problems.append(f"{name}: no {part}.{resource}")
    for probe in ("readinessProbe", "livenessProbe") if serves else ():
        if probe not in container:
            problems.append(f"{name}: no {probe}")
    security = container.get("securityContext", {})
    if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
        problems.append(f"{name}: runAsNonRoot is not set")
    if security.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{name}: root filesystem is writable")
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{name}: allowPrivilegeEscalation is not false")
    if "ALL" not in security.get("capabilities", {}).get("drop", []):
        problems.append(f"{name}: capabilities are not all dropped")
    image = container.get("image", "")
    tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
    if not tag or tag == "latest":
        problems.append(f"{name}: image {image!r} is not pinned to a tag (and must not be :latest)")
    return problems


DEFAULT_GRACE_S = 30  # Kubernetes' terminationGracePeriodSeconds when a pod does not set it


def termination_problems(obj: dict[str, Any], where: str) -> list[str]:
    """A serving container closes its listener on SIGTERM, while kube-proxy and ingresses may still send it
    new connections for a few seconds: they are reset. A preStop sleep delays SIGTERM past that."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "Deployment":
        grace = spec["template"]["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
    elif kind == "InferenceService":
        grace = (spec.get("transformer") or {}).get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
    elif kind == "ServingRuntime":
        grace = DEFAULT_GRACE_S
    else:
        return []  # Jobs run to completion; the single-replica Redis StatefulSet has nowhere to send traffic
    problems = []
    for container, _ in containers(obj):
        name = f"{where} container {container.get('name')}"
        command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        if len(command) != 2 or command[0] != "sleep" or not re.fullmatch(r"\d+(\.\d+)?", str(command[1])):
            problems.append(f"{name}: no preStop sleep of N seconds (SIGTERM would reset connections routed to it)")
        elif not 0 < float(command[1]) < grace:
            problems.append(f"{name}: preStop sleeps {command[1]} s, not inside the {grace} s grace period")
    return problems


def requests_gpu(objects: list[dict[str, Any]]) -> bool:
    text = json.dumps([o for o in objects if o["kind"] in {"Deployment", "InferenceService", "ServingRuntime"}])
    return "nvidia.com/gpu" in text


def core_problems(obj: dict[str, Any], where: str) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{where}: {err.message} at {'/'.join(str(p) for p in err.path)}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [f"{where}: no Kubernetes {KUBERNETES_VERSION} schema for {obj['apiVersion']} {obj['kind']} ({err})"]
    return []


# -- custom resources ------------------------------------------------------------------------------
KSERVE_MODELS = {"InferenceService": "V1beta1InferenceService", "ServingRuntime": "V1alpha1ServingRuntime"}
OPENAPI_PRIMITIVES = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "float": (int, float),
    "datetime": (str,),
    "date": (str,),
    "V1beta1MetricQuantity": (str, int, float),  # a resource.Quantity: int-or-string in the API server
}


def _openapi_model(name: str) -> Any:
    import kserve.models as kserve_models
    import kubernetes.client.models as kubernetes_models

    # KServe's spec names core types by Go package ('K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior'),
    # the Kubernetes client by version and kind ('V2HorizontalPodAutoscalerBehavior').
    core = re.fullmatch(r"K8sIoApi[A-Z][a-z]+(V\d+(?:(?:alpha|beta)\d+)?)(\w+)", name)
    return getattr(kserve_models, name, None) or getattr(kubernetes_models, "".join(core.groups()) if core else name)


def openapi_problems(value: Any, type_name: str, path: str) -> list[str]:
    """Check a manifest fragment against an OpenAPI-generated model type ('V1Container', 'list[...]', ...)."""
    if type_name in ("object", "Any"):
        return []
    if type_name.startswith(("list[", "List[")):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [p for i, item in enumerate(value) for p in openapi_problems(item, type_name[5:-1], f"{path}[{i}]")]
    if type_name.startswith(("dict(", "Dict[")):  # 'dict(str, X)' (kubernetes client) or 'Dict[str, X]'
        if not isinstance(value, dict):
            return [f"{path}: expected a map, got {type(value).__name__}"]
        inner = type_name[5:-1].split(", ", 1)[1]
        return [p for key, item in value.items() for p in openapi_problems(item, inner, f"{path}.{key}")]
    if type_name in OPENAPI_PRIMITIVES:
        accepted = OPENAPI_PRIMITIVES[type_name]
        if type_name == "str" and path.rsplit(".", 2)[-2:-1] in (["limits"], ["requests"]):
            accepted = (str, int, float)  # resource quantities: int-or-string in the API server
        if isinstance(value, bool) and bool not in accepted:
            return [f"{path}: expected {type_name}, got a boolean"]
        return (
            []
            if isinstance(value, accepted)
            else [f"{path}: expected {type_name}, got {type(value).__name__} {value!r}"]
        )
    model = _openapi_model(type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected an object ({type_name}), got {type(value).__name__}"]
    by_json_name = {json_name: attr for attr, json_name in model.attribute_map.items()}
    problems = []
    for key, item in value.items():
        if key not in by_json_name:
            problems.append(f"{path}: unknown field {key!r} for {type_name}")
        else:
            problems += openapi_problems(item, model.openapi_types[by_json_name[key]], f"{path}.{key}")
    return problems


def _dropped_keys(given: Any, kept: Any, path: str) -> list[str]:
    """Keys present in the manifest but absent after a round trip through the model: unknown fields."""
    if isinstance(given, dict) and isinstance(kept, dict):
        return [
            p
            for key, item in given.items()
            for p in (
                [f"{path}: unknown field {key!r}"]
                if key not in kept
                else _dropped_keys(item, kept[key], f"{path}.{key}")
            )
        ]
    if isinstance(given, list) and isinstance(kept, list):
        return [p for i, (a, b) in enumerate(zip(given, kept)) for p in _dropped_keys(a, b, f"{path}[{i}]")]
    return []


def custom_resource_problems(obj: dict[str, Any], where: str) -> list[str]:
    kind = obj["kind"]
    if kind in KSERVE_MODELS:
        return [f"{where}: {p}" for p in openapi_problems(obj, KSERVE_MODELS[kind], kind)]
    module, package = CRD_MODELS[kind]
    try:
        models = importlib.import_module(module)
    except ImportError:
        return [f"{where}: {package} is not installed (pip install -e '.[test]')"]
    import pydantic

    model = getattr(models, kind)
    try:
        parsed = model.model_validate(obj)
    except pydantic.ValidationError as err:
        return [f"{where}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
    kept = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"{where}: {p}" for p in _dropped_keys(obj, kept, kind)]


def dashboard_problems(obj: dict[str, Any], where: str) -> list[str]:
    if obj.get("metadata", {}).get("labels", {}).get("grafana_dashboard") != "1":
        return [f"{where}: missing label grafana_dashboard=1 (the Grafana sidecar would not load it)"]
    problems = []
    for name, text in obj.get("data", {}).items():
        try:
            dashboard = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(f"{where} {name}: not JSON ({err})")
            continue
        for panel in dashboard.get("panels", []):
            if not [t for t in panel.get("targets", []) if t.get("expr")]:
                problems.append(f"{where} {name}: panel {panel.get('title')!r} has no query")
    return problems


def promtool_problems(obj: dict[str, Any], where: str) -> list[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        print(f"note: promtool not found; {where} checked by the Prometheus test only")
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as rules:
        yaml.safe_dump({"groups": obj["spec"]["groups"]}, rules)
        rules.flush()
        result = subprocess.run([promtool, "check", "rules", rules.name], capture_output=True, text=True)
    return [] if result.returncode == 0 else [f"{where}: promtool: {result.stdout.strip()} {result.stderr.strip()}"]


def _flag(args: list[str], name: str) -> str:
    """The value of --name=value or --name value in a container's args ("" if absent)."""
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return ""


def _retriever_container(containers: list[dict[str, Any]]) -> dict[str, Any]:
    """The container that runs the retriever: the one told where Triton is ({} if none)."""
    return next((c for c in containers if _flag(c.get("args", []), "--predictor_host")), {})


def _port_of(address: str) -> str:
    return address.rpartition(":")[2]


def admission_proxy_problems(objects: list[dict[str, Any]]) -> list[str]:
    """The HAProxy admission sidecar must sit in the request path and reach the retriever beside it.

    Its addresses come from the environment with admission-proxy.cfg's defaults (bind :8088, retriever
    127.0.0.1:8080). Under KServe (RawDeployment) the transformer Service targets the FIRST container's first
    port (kserve/kserve reconcilers/service createDefaultSvc) and KServe appends --model_name, --predictor_host
    and --http_port to that container's args (v1beta1 CustomTransformer.GetContainer): there the proxy must be
    first, listen on that port, and run under a `command` that ignores those arguments.
    """
    problems = []
    pods: list[tuple[str, list[dict[str, Any]], bool]] = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Deployment":
            pods.append((where, obj["spec"]["template"]["spec"]["containers"], False))
        elif obj["kind"] == "InferenceService" and obj["spec"].get("transformer"):
            pods.append((where, obj["spec"]["transformer"].get("containers") or [], True))
    for where, pod_containers, kserve in pods:
        proxies = [c for c in pod_containers if "haproxy" in c.get("image", "")]
        retriever = _retriever_container(pod_containers)
        if not proxies or not retriever:
            continue
        proxy = proxies[0]
        env = {e["name"]: e.get("value", "") for e in proxy.get("env", [])}
        bind = _port_of(env.get("PROXY_BIND", ":8088"))
        target = _port_of(env.get("RETRIEVER_ADDRESS", "127.0.0.1:8080"))
        listens = _flag(retriever.get("args", []), "--http_port")
        if target != listens:
            problems.append(
                f"{where}: the admission proxy sends to port {target}, the retriever listens on "
                f"{listens or 'its default'}"
            )
        if bind not in {str(p["containerPort"]) for p in proxy.get("ports", [])}:
            problems.append(f"{where}: the admission proxy binds port {bind}, which its container does not declare")
        if kserve:
            first = pod_containers[0]
            first_port = str((first.get("ports") or [{}])[0].get("containerPort", ""))
            if first is not proxy or first_port != bind:
                problems.append(
                    f"{where}: KServe's transformer Service reaches the first container's first port "
                    f"({first.get('name')}: {first_port or 'none'}), not the admission proxy's {bind}"
                )
            elif not proxy.get("command"):
                problems.append(
                    f"{where}: KServe appends --model_name/--predictor_host/--http_port to the first container's "
                    "args: the proxy needs a `command` that ignores them"
                )
    return problems


def predictor_address_problems(objects: list[dict[str, Any]]) -> list[str]:
    """The retriever (transformer) must reach Triton's HTTP port at the address it is given.

    In RawDeployment KServe's controller creates the predictor Service `<isvc>-predictor` with port 80
    pointing at the FIRST port the runtime container declares (kserve/kserve,
    pkg/controller/v1beta1/inferenceservice/reconcilers/service/service_reconciler.go, createDefaultSvc);
    the retriever speaks HTTP/1.1 REST, so that port must be Triton's --http-port, not its gRPC port.
    """
    problems = []
    runtimes = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServingRuntime"}
    for isvc in (o for o in objects if o["kind"] == "InferenceService"):
        name, where = isvc["metadata"]["name"], f"InferenceService/{isvc['metadata']['name']}"
        runtime = runtimes.get(isvc["spec"]["predictor"].get("model", {}).get("runtime", ""))
        transformer = _retriever_container(isvc["spec"].get("transformer", {}).get("containers") or [])
        host = _flag(transformer.get("args", []), "--predictor_host")
        if runtime is None or not host:
            continue
        address, _, port = host.partition(":")
        if address.split(".")[0] != f"{name}-predictor":
            problems.append(f"{where}: transformer --predictor_host {host!r} is not the {name}-predictor Service")
            continue
        triton = runtime["spec"]["containers"][0]
        ports = triton.get("ports") or []
        http_port = _flag(triton.get("args", []), "--http-port") or "8000"
        if port not in ("", "80"):
            problems.append(f"{where}: --predictor_host {host!r}: the predictor Service listens on port 80 only")
        elif not ports or str(ports[0]["containerPort"]) != http_port:
            first = ports[0]["containerPort"] if ports else "none"
            problems.append(
                f"{where}: the predictor Service's port 80 reaches the runtime's first declared port ({first}), "
                f"not Triton's HTTP port {http_port} that the retriever speaks REST to"
            )
    return problems


def artifacts_access_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Only Jobs write the artifacts volume: every server mounts it read-only."""
    problems = []
    for obj in objects:
        if obj["kind"] in ("Job", "PersistentVolumeClaim"):
            continue
        pod = obj.get("spec", {}).get("template", {}).get("spec") or obj.get("spec", {}).get("transformer") or {}
        artifact_volumes = {
            v["name"]
            for v in pod.get("volumes", [])
            if v.get("persistentVolumeClaim", {}).get("claimName") == "hm-artifacts"
        }
        for container in pod.get("containers", []):
            for mount in container.get("volumeMounts", []):
                if mount["name"] in artifact_volumes and not mount.get("readOnly"):
                    problems.append(f"{obj['kind']}/{obj['metadata']['name']}: mounts the artifacts volume writable")
    return problems


def _retriever_metric_families() -> set[str]:
    """The metric families the retriever registers (retriever/metrics.py), as Prometheus names them."""
    import prometheus_client

    import retriever.metrics  # noqa: F401  (registers them)

    return {family.name for family in prometheus_client.REGISTRY.collect() if family.name.startswith("retriever_")}


def promql_queries(obj: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every query an object hands to Prometheus: alerts, dashboards, autoscalers."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind == "PrometheusRule":
        for group in obj["spec"]["groups"]:
            for rule in group["rules"]:
                yield f"{kind}/{name} {rule.get('alert') or rule.get('record')}", rule["expr"]
    elif kind == "ConfigMap" and name.endswith("-dashboard"):
        for file, text in obj.get("data", {}).items():
            for panel in json.loads(text).get("panels", []):
                for target in panel.get("targets", []):
                    yield f"{kind}/{name} {file} panel {panel.get('title')!r}", target.get("expr", "")
    elif kind == "ScaledObject":
        for trigger in obj["spec"].get("triggers", []):
            if trigger.get("type") == "prometheus":
                yield f"{kind}/{name} trigger", trigger["metadata"].get("query", "")
    elif kind == "InferenceService":
        for component in ("predictor", "transformer"):
            for metric in (obj["spec"].get(component) or {}).get("autoScaling", {}).get("metrics", []):
                external = metric.get("external", {}).get("metric", {})
                if external.get("backend") == "prometheus":
                    yield f"{kind}/{name} {component} autoScaling", external.get("query", "")


def metric_name_problems(objects: list[dict[str, Any]], known: set[str] | None = None) -> list[str]:
    """A query over a retriever_* metric the retriever does not export is silently empty: an alert that
    never fires, a flat panel, an autoscaler stuck at its minimum."""
    known = _retriever_metric_families() if known is None else known
    problems = []
    for obj in objects:
        for where, query in promql_queries(obj):
            for series in sorted(set(re.findall(r"\bretriever_\w+", query))):
                family = re.sub(r"_(total|bucket|sum|count|created)$", "", series)
                if family not in known:
                    problems.append(f"{where}: {series} is not a metric the retriever exports")
    return problems


def autoscaling_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Autoscalers a cluster would refuse, or that would fight over one workload."""
    problems = []
    workloads = {(o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] in ("Deployment", "StatefulSet")}
    scaled: dict[tuple[str, str], str] = {}
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("ScaledObject", "HorizontalPodAutoscaler"):
            ref = obj["spec"]["scaleTargetRef"]
            target = (ref.get("kind", "Deployment"), ref["name"])
            if target not in workloads:
                problems.append(f"{where}: scales {target[0]}/{target[1]}, which this overlay does not deploy")
            elif target in scaled:
                # KEDA's admission webhook refuses a ScaledObject for a workload an HPA already scales;
                # two HPAs on one workload fight over its replica count.
                problems.append(f"{where}: {target[0]}/{target[1]} is already scaled by {scaled[target]}")
            scaled.setdefault(target, where)
        if obj["kind"] == "ScaledObject" and obj["spec"].get("fallback"):
            # KEDA's CheckFallbackValid (kedacore/keda, apis/keda/v1alpha1): fallback only for AverageValue
            # triggers, never with the cpu/memory scalers.
            for trigger in obj["spec"]["triggers"]:
                if trigger["type"] in ("cpu", "memory") or trigger.get("metricType", "AverageValue") != "AverageValue":
                    problems.append(f"{where}: fallback with a {trigger['type']} trigger: KEDA refuses it")
        if obj["kind"] == "InferenceService":
            for component in ("predictor", "transformer"):
                spec = obj["spec"].get(component) or {}
                kinds = {m.get("type") for m in spec.get("autoScaling", {}).get("metrics", [])}
                annotations = {**obj["metadata"].get("annotations", {}), **spec.get("annotations", {})}
                # KServe's HPA reconciler reads only resource metrics (reconcilers/hpa); External and
                # PodMetric sources are written into a KEDA ScaledObject (reconcilers/keda) only.
                if kinds & {"External", "PodMetric"} and annotations.get("serving.kserve.io/autoscalerClass") != "keda":
                    problems.append(
                        f"{where}: {component} autoScaling has external metrics but its autoscalerClass is not keda"
                    )
    return problems


def check_overlay(overlay: str, needs_gpu: bool) -> list[str]:
    objects = render(overlay)
    problems = []
    for obj in objects:
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] not in CUSTOM_KINDS:
            problems += core_problems(obj, where)
        else:
            problems += custom_resource_problems(obj, where)
        for container, pod_security in containers(obj):
            problems += container_problems(where, container, pod_security, serves=obj["kind"] != "Job")
        problems += termination_problems(obj, where)
        if obj["kind"] == "InferenceService":
            model = obj["spec"]["predictor"].get("model", {})
            for part in ("requests", "limits"):
                if not model.get("resources", {}).get(part):
                    problems.append(f"{where}: predictor model has no resources.{part}")
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].endswith("-dashboard"):
            problems += dashboard_problems(obj, where)
        if obj["kind"] == "PrometheusRule":
            problems += promtool_problems(obj, where)
    problems += [f"{overlay}: {p}" for p in predictor_address_problems(objects)]
    problems += [f"{overlay}: {p}" for p in admission_proxy_problems(objects)]
    problems += [f"{overlay}: {p}" for p in artifacts_access_problems(objects)]
    problems += [f"{overlay}: {p}" for p in autoscaling_problems(objects)]
    problems += [f"{overlay}: {p}" for p in metric_name_problems(objects)]
    if needs_gpu != requests_gpu(objects):
        problems.append(f"{overlay}: {'requests no GPU' if needs_gpu else 'requests a GPU'}")
    print(f"{overlay}: {len(objects)} objects, {len(problems)} problem(s)")
    return problems


def main() -> int:
    problems = [p for overlay, gpu in OVERLAYS.items() for p in check_overlay(overlay, gpu)]
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
