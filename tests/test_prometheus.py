"""A real Prometheus scrapes the real retriever, Triton and the HAProxy admission sidecar in front of the
retriever (the raw overlays' pod); every dashboard and alert query returns data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from localtriton.process import free_port, wait_until_ready
from localtriton.server import stop_process
from retriever.launch import AdmissionProxy

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus package is not installed"),
]
MONITORING = Path(__file__).resolve().parents[1] / "k8s" / "components" / "monitoring"
COMPARISON = re.compile(r"^(?P<query>.*?)\s*(>|<|>=|<=|==|!=)\s*[0-9.e+-]+\s*$", re.S)


def alert_groups() -> list[dict]:
    return yaml.safe_load((MONITORING / "alert-rules.yaml").read_text())["spec"]["groups"]


def dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "dashboards" / "hm-two-tower.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


@pytest.fixture(scope="module")
def sidecar(retriever, tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("haproxy") is None:
        pytest.skip("Debian's haproxy package is not installed (make tools)")
    with AdmissionProxy(retriever.url, tmp_path_factory.mktemp("admission-proxy") / "haproxy.log") as proxy:
        yield proxy


@pytest.fixture(scope="module")
def prometheus(retriever, triton, sidecar, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("prometheus")
    (root / "rules.yaml").write_text(yaml.safe_dump({"groups": alert_groups()}))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(root / "rules.yaml")],
        "scrape_configs": [
            {"job_name": "retriever", "static_configs": [{"targets": [f"127.0.0.1:{retriever.http_port}"]}]},
            {"job_name": "triton", "static_configs": [{"targets": [f"127.0.0.1:{triton.settings.metrics_port}"]}]},
            {"job_name": "admission-proxy", "static_configs": [{"targets": [f"127.0.0.1:{sidecar.metrics_port}"]}]},
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = root / "prometheus.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_ready(process, f"http://127.0.0.1:{port}/-/ready", 60, "prometheus", log_path)
        yield f"http://127.0.0.1:{port}", root
    finally:
        stop_process(process.pid, 15, process)


def query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_promtool_accepts_the_alert_rules(prometheus) -> None:
    _, root = prometheus
    result = subprocess.run(["promtool", "check", "rules", str(root / "rules.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_error_alert_fires_on_server_errors_and_shedding_not_on_client_mistakes(tmp_path: Path) -> None:
    """promtool's rule tests feed series through the real rule engine: 100 requests/s of which 2/s fail
    (Triton down, or shed) fires after its 5 minutes; 50/s of 4xx (a client's mistake) never does."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": alert_groups()}))
    (rule,) = [r for g in alert_groups() for r in g["rules"] if r["alert"] == "RecommenderErrorRateHigh"]
    annotations = {"summary": rule["annotations"]["summary"], "description": "Server-side error ratio is 2%."}
    fired = {"exp_alerts": [{"exp_labels": {"severity": "critical"}, "exp_annotations": annotations}]}

    def case(reason: str, errors_per_minute: int, expected: dict) -> dict:
        return {
            "interval": "1m",
            "input_series": [
                {"series": "retriever_api_requests_total", "values": "0+6000x20"},
                {"series": f'retriever_errors_total{{reason="{reason}"}}', "values": f"0+{errors_per_minute}x20"},
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "RecommenderErrorRateHigh", "exp_alerts": []},  # not yet: for 5m
                {"eval_time": "15m", "alertname": "RecommenderErrorRateHigh", **expected},
            ],
        }

    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            case("triton_unavailable", 120, fired),
            case("overloaded", 120, fired),
            case("invalid_input", 3000, {"exp_alerts": []}),
            case("too_large", 3000, {"exp_alerts": []}),
            case("internal", 30, {"exp_alerts": []}),  # 0.5%: under the 1% threshold
        ],
    }
    promtool_test_rules(tmp_path, tests)


def promtool_test_rules(directory: Path, tests: dict) -> None:
    (directory / "tests.yaml").write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        ["promtool", "test", "rules", "tests.yaml"], capture_output=True, text=True, cwd=directory, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_sidecar_alert_fires_on_shedding_at_the_proxy(tmp_path: Path) -> None:
    """100 requests/s through the sidecar, 2/s of them refused there: fires after its 5 minutes."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": alert_groups()}))
    (rule,) = [r for g in alert_groups() for r in g["rules"] if r["alert"] == "RecommenderSidecarErrorRateHigh"]
    description = "Ratio 2%; the sidecar's panel says whether its queue was full."
    fired = [
        {"exp_labels": {"severity": "critical"}, "exp_annotations": {**rule["annotations"], "description": description}}
    ]
    series = [
        {"series": 'haproxy_frontend_http_requests_total{proxy="retriever"}', "values": "0+6000x20"},
        {"series": 'haproxy_frontend_http_responses_total{proxy="retriever",code="5xx"}', "values": "0+120x20"},
    ]
    alert = "RecommenderSidecarErrorRateHigh"
    test = {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": alert, "exp_alerts": []},
            {"eval_time": "15m", "alertname": alert, "exp_alerts": fired},
        ],
    }
    promtool_test_rules(tmp_path, {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [test]})


def test_every_dashboard_and_alert_query_returns_data(prometheus, retriever, sidecar) -> None:
    base, _ = prometheus
    predict_url = sidecar.through(retriever.predict_url)  # as clients reach the pod
    bodies = [{"instances": [{"query": "black dress"}]}, {"instances": [{"query": ""}]}]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # a few seconds of steady load, several scrapes
        for body in bodies:
            request = urllib.request.Request(
                predict_url, json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            try:
                urllib.request.urlopen(request, timeout=10).read()
            except urllib.error.HTTPError:
                pass
        if (
            time.monotonic() > deadline - 12
            and query(base, 'up{job="retriever"} == 1')
            and query(base, 'up{job="triton"} == 1')
            and query(base, 'up{job="admission-proxy"} == 1')
        ):
            break
        time.sleep(0.05)
    time.sleep(3)
    expressions = [e.replace("$__rate_interval", "30s") for e in dashboard_queries()]
    expressions += [COMPARISON.match(r["expr"]).group("query") for g in alert_groups() for r in g["rules"]]
    empty = [e for e in expressions if not e.startswith("avg by (gpu_uuid) (nv_gpu") and not query(base, e)]
    assert not empty, f"queries without data: {empty}"
