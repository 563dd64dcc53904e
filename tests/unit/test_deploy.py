"""Deployment files agree with the service: dashboard metrics, ports, probes, config."""

from __future__ import annotations

import json
import pathlib
import re
import tomllib

import prometheus_client
import yaml

import align2.server.metrics  # noqa: F401  (registers our metrics)
from align2.server import config as config_module

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"


def exported_series() -> set[str]:
    """Every series name the service can export (histogram and counter suffixes added)."""
    names = set()
    for family in prometheus_client.REGISTRY.collect():
        suffixes = {
            "histogram": ["_bucket", "_sum", "_count", "_created"],
            "counter": ["_total", "_created"],
        }.get(family.type, [""])
        names.update(family.name + s for s in suffixes)
    return names


def test_every_dashboard_metric_is_exported() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "align2-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:align2|process)_[a-z_]+)\b", e)}
    assert len(used) >= 10
    missing = used - exported_series()
    assert not missing, f"the dashboard queries series the service does not export: {missing}"


def manifests() -> dict[str, dict]:
    return {
        doc["kind"]: doc
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    }


def test_k8s_ports_probes_grace_and_hpa_metric_agree_with_the_server() -> None:
    docs = manifests()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = config_module.from_dict(
        tomllib.loads(docs["ConfigMap"]["data"]["align2.toml"])
    )  # the shipped config is valid align2 config
    # ... and serves what the README says a deployment serves: Score, Align and Curate.
    assert config.score.enabled and config.curate_enabled
    assert config.align_off_reason == ""
    assert ports == {"grpc": config.server.port, "metrics": config.server.metrics_port}
    assert pod["terminationGracePeriodSeconds"] > config.server.grace_seconds
    assert container["readinessProbe"]["grpc"]["service"] == "align2.v1.CurationService"
    assert container["livenessProbe"]["grpc"]["port"] == config.server.port
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    service = docs["Service"]["spec"]
    assert service["clusterIP"] == "None"  # headless: client-side balancing
    assert {p["targetPort"] for p in service["ports"]} == set(ports)
    assert docs["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    # /metrics has no TLS and no tokens: only the monitoring namespace may reach it.
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"] == docs["Deployment"]["spec"]["selector"]
    rules = {p["port"]: rule.get("from") for rule in policy["ingress"] for p in rule["ports"]}
    assert set(rules) == set(ports)
    [source] = rules["metrics"]
    assert source["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    hpa_metric = docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert hpa_metric in exported_series()


def test_every_limit_in_server_info_has_a_config_key_operators_can_find() -> None:
    """Error messages name limits by their GetServerInfo field; docs/operating.md maps the
    ones that are not ``[limits] NAME`` to their config key, and every key it names exists;
    a fixed limit is listed with its value, which is the server's."""
    from align2.server.core.selection_keys import MAX_NAME_LENGTH
    from align2.v1 import curation_pb2 as pb

    text = (ROOT / "docs" / "operating.md").read_text()
    fixed = dict(re.findall(r"^\| `limits\.(\w+)` \| none: fixed at (\d+) \|$", text, re.M))
    assert fixed == {"max_name_length": str(MAX_NAME_LENGTH)}
    mapped: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"^\| (`limits\.\w+`(?:, `limits\.\w+`)*) \| `(\w+)\.(\w*)`", line)
        if match:
            names = re.findall(r"`limits\.(\w+)`", match.group(1))
            for name in names:
                mapped[name] = f"{match.group(2)}.{match.group(3) or name}"
    config = config_module.Config()
    for field in pb.Limits.DESCRIPTOR.fields:
        if field.name in fixed:
            continue
        key = mapped.get(field.name, f"limits.{field.name}")
        section, attribute = key.split(".")
        assert hasattr(getattr(config, section), attribute), (field.name, key)


def test_every_curate_decision_label_is_documented_where_operators_read_it() -> None:
    """Alerts that sum the documented decision values must see every one the counter can
    carry. Fails on: a Decision value missing from the HELP text or docs/operating.md."""
    from align2.server.core.curation import Decision
    from align2.server.metrics import CURATE_DECISIONS

    row = next(
        line
        for line in (ROOT / "docs" / "operating.md").read_text().splitlines()
        if line.startswith("| `align2_curate_decisions_total`")
    )
    for decision in Decision:
        assert decision.value in CURATE_DECISIONS._documentation, decision
        assert re.search(rf"\b{decision.value}\b", row), decision


def test_latency_histograms_reach_ten_minutes() -> None:
    """The inner LLM's queue waits ran to minutes on a busy server (72 s on average in a
    review's run): a top bucket of 60 s pinned the dashboard's p99 there."""
    from align2.server import metrics

    for histogram in (metrics.QUEUE_SECONDS, metrics.REQUEST_SECONDS, metrics.COMPUTE_SECONDS):
        assert histogram._upper_bounds[-5:] == [60, 120, 300, 600, float("inf")]
