"""Every kustomization builds, every object validates, the rules pass promtool, generated files are fresh."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from adapter.config import parse_metadata

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
KUSTOMIZATIONS = ["base", "monitoring", "overlays/prometheus-operator", "overlays/exporter-daemonset",
                  "overlays/queue", "overlays/queue-with-redis", "overlays/scaler-access", "overlays/tls"]
KEDA_CRD = ROOT.parent / "shared" / "reference" / "keda" / "keda.sh_scaledobjects.yaml"
KUBERNETES_VERSION = "1.34.0"
RULES = MANIFESTS / "monitoring" / "rules"


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide {tool} (.ci/run installs it)")
        pytest.skip(f"{tool} is not installed")
    return path


@cache
def build(kustomization: str) -> tuple[dict, ...]:
    kubectl = require("kubectl")
    result = subprocess.run([kubectl, "kustomize", str(MANIFESTS / kustomization)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(kind: str, kustomization: str = "base") -> list[dict]:
    return [o for o in build(kustomization) if o["kind"] == kind]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_kustomization_builds(kustomization):
    assert build(kustomization)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_core_object_validates_against_the_kubernetes_schemas(kustomization):
    checked = 0
    for obj in build(kustomization):
        group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
        if "." in group and not group.endswith(".k8s.io"):
            continue  # custom resources: checked against their own CRDs below (RBAC's, networking's are Kubernetes')
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        checked += 1
    assert checked


@pytest.mark.parametrize("kustomization", ["base", "overlays/prometheus-operator", "overlays/exporter-daemonset",
                                           "overlays/queue", "overlays/tls"])
def test_the_scaledobject_validates_against_kedas_crd_and_the_scalers_parser(kustomization):
    if not KEDA_CRD.exists():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{KEDA_CRD} is missing")
    crd = yaml.safe_load(KEDA_CRD.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    [scaled_object] = objects("ScaledObject", kustomization)
    jsonschema.validate(scaled_object, version["schema"]["openAPIV3Schema"])
    [trigger] = scaled_object["spec"]["triggers"]
    # Parsed as the shipped scaler parses it: its flags' rules, confined to the ScaledObject's namespace.
    spec = parse_metadata(trigger["metadata"], shipped_scaler_config(kustomization).access,
                          namespace=scaled_object["metadata"]["namespace"])
    assert spec.unknown_keys == ()
    # The HPA must not stack its own windows on the scaler's.
    behavior = scaled_object["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 0
    assert scaled_object["spec"]["fallback"]["replicas"] >= 1
    assert int(trigger["metadata"]["maxReplicas"]) == scaled_object["spec"]["maxReplicaCount"]


def shipped_scaler_config(kustomization: str):
    """The scaler's ServerConfig as its Deployment's environment sets it (a value from a Secret
    reads as a placeholder of the right kind)."""
    from adapter.__main__ import build_parser, config_from_args

    [scaler] = [d for d in objects("Deployment", kustomization) if d["metadata"]["name"] == "diffusion-scaler"]
    variables = {e["name"]: e.get("value") or _from_secret(kustomization, e) for e in container(scaler, "scaler")["env"]}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update({name: value for name, value in variables.items() if value is not None})
    try:
        return config_from_args(build_parser().parse_args([]))
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def _from_secret(kustomization: str, variable: dict) -> str | None:
    """What a Secret the kustomization generates holds for `variable`'s secretKeyRef; None when
    it generates none (the user creates it)."""
    ref = (variable.get("valueFrom") or {}).get("secretKeyRef")
    if ref is None:
        return None
    import base64

    for secret in objects("Secret", kustomization):
        if secret["metadata"]["name"] == ref["name"] and ref["key"] in secret.get("data", {}):
            return base64.b64decode(secret["data"][ref["key"]]).decode()
    return None


def container(deployment: dict, name: str) -> dict:
    [found] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def test_the_worker_pod_drains_inside_its_grace_period_and_probes_real_paths():
    [worker] = [d for d in objects("Deployment") if d["metadata"]["name"] == "sd-worker"]
    pod = worker["spec"]["template"]["spec"]
    main = container(worker, "worker")
    assert pod["terminationGracePeriodSeconds"] > float(env(main)["WORKER_DRAIN_TIMEOUT"])
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    sidecar = container(worker, "exporter")
    assert {"POD_NAME", "POD_NAMESPACE", "CONTAINER_NAME"} <= set(env(sidecar))
    assert env(sidecar)["EXPORTER_VISIBLE_DEVICES_FILE"].startswith("/run/gpu/")
    assert "/run/gpu/visible-devices" in " ".join(main["command"])


def test_every_environment_variable_names_a_real_flag():
    from adapter.__main__ import build_parser as scaler_parser
    from exporter.__main__ import build_parser as exporter_parser
    from gateway.__main__ import build_parser as gateway_parser
    from worker.__main__ import build_parser as worker_parser

    def flags(parser) -> set[str]:
        found = set()
        for action in parser._actions:
            found.update(action.option_strings)
            if isinstance(action.choices, dict):  # subcommands
                for subparser in action.choices.values():
                    found |= flags(subparser)
        return found

    known = {"WORKER_": flags(worker_parser()), "EXPORTER_": flags(exporter_parser()), "SCALER_": flags(scaler_parser()),
             "GATEWAY_": flags(gateway_parser())}
    # a password's value comes from the environment only, never a flag (contract.jobqueue.password_from)
    values_only = {"WORKER_REDIS_PASSWORD", "GATEWAY_REDIS_PASSWORD", "SCALER_REDIS_PASSWORD"}
    for kustomization in ("base", "overlays/exporter-daemonset", "overlays/queue-with-redis"):
        for workload in objects("Deployment", kustomization) + objects("DaemonSet", kustomization):
            for c in workload["spec"]["template"]["spec"]["containers"]:
                for name in set(env(c)) - values_only:
                    for prefix, options in known.items():
                        if name.startswith(prefix):
                            flag = "--" + name.removeprefix(prefix).lower().replace("_", "-")
                            assert flag in options, f"{name} in {c['name']} sets no flag ({flag})"


def test_the_queue_overlay_scales_the_workers_from_zero_on_the_streams_backlog():
    [scaled_object] = objects("ScaledObject", "overlays/queue")
    spec = scaled_object["spec"]
    assert spec["minReplicaCount"] == 0 and spec["cooldownPeriod"] == 60 and spec["pollingInterval"] == 5
    metadata = spec["triggers"][0]["metadata"]
    [worker] = [d for d in objects("Deployment", "overlays/queue") if d["metadata"]["name"] == "sd-worker"]
    [gateway] = [d for d in objects("Deployment", "overlays/queue") if d["metadata"]["name"] == "diffusion-gateway"]
    worker_env, gateway_env = env(container(worker, "worker")), env(container(gateway, "gateway"))
    # one stream: the gateway writes it, the workers read it, the scaler counts it
    assert metadata["stream"] == worker_env["WORKER_STREAM"] == gateway_env["GATEWAY_STREAM"]
    assert parse_metadata(metadata).policy.min_replicas == 0
    for c in (container(worker, "worker"), container(gateway, "gateway")):
        secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e
                   and "secretKeyRef" in e["valueFrom"]}
        assert {ref["name"] for ref in secrets.values()} == {"diffusion-redis"}
        assert {ref["key"] for ref in secrets.values()} == {"address", "password"}
    # the throwaway Redis is reachable only from the pods that use it
    [policy] = [p for p in objects("NetworkPolicy", "overlays/queue-with-redis")
                if p["metadata"]["name"] == "redis-clients-only"]
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    clients = [d for d in objects("Deployment", "overlays/queue-with-redis") if d["metadata"]["name"] != "redis"]
    assert {d["metadata"]["name"] for d in clients} == {"sd-worker", "diffusion-gateway", "diffusion-scaler"}
    assert all(allowed.items() <= d["spec"]["template"]["metadata"]["labels"].items() for d in clients)


def test_the_daemonset_overlay_replaces_the_sidecar_and_mounts_pod_resources_writable():
    [worker] = [d for d in objects("Deployment", "overlays/exporter-daemonset") if d["metadata"]["name"] == "sd-worker"]
    assert [c["name"] for c in worker["spec"]["template"]["spec"]["containers"]] == ["worker"]
    [daemonset] = objects("DaemonSet", "overlays/exporter-daemonset")
    exporter = daemonset["spec"]["template"]["spec"]["containers"][0]
    assert env(exporter)["EXPORTER_MODE"] == "daemonset"
    [mount] = [m for m in exporter["volumeMounts"] if m["mountPath"] != "/tmp"]  # /tmp: the image's scratch
    assert mount["mountPath"] == "/var/lib/kubelet/pod-resources" and not mount.get("readOnly")


def granted(role: dict) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every rule of a Role."""
    assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in role["rules"])  # no names, no URLs
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


# Each call the scaler makes through the kubernetes client, and what it needs: get a ScaledObject,
# then its Deployment or StatefulSet (adapter/kube.py); create and patch Events (adapter/kubeevents.py).
API_CALLS = {
    "get_namespaced_custom_object": {("keda.sh", "scaledobjects", "get"), ("apps", "deployments", "get"),
                                     ("apps", "statefulsets", "get")},
    "create_namespaced_event": {("", "events", "create")},
    "patch_namespaced_event": {("", "events", "patch")},
}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_nothing_is_granted_cluster_wide(kustomization):
    assert not objects("ClusterRole", kustomization) and not objects("ClusterRoleBinding", kustomization)


@pytest.mark.parametrize(("kustomization", "namespace"), [("base", "ml"), ("overlays/scaler-access", "models")])
def test_the_scaler_is_granted_in_the_namespace_of_its_scaledobjects_what_its_api_calls_need(kustomization, namespace):
    [account] = objects("ServiceAccount")
    [role] = objects("Role", kustomization)
    [binding] = objects("RoleBinding", kustomization)
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == namespace
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": account["metadata"]["namespace"]}
    ]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert granted(role) == set().union(*API_CALLS.values())


def test_the_api_calls_in_the_scalers_code_are_the_ones_the_role_was_checked_against():
    """A new call (a list, a watch, another kind) fails here until the Role and API_CALLS say what it needs."""
    called = set()
    for path in (ROOT / "adapter").glob("*.py"):
        called |= set(re.findall(r"self\._(?:api|core|custom|apps)\.(\w+)", path.read_text()))
    assert called == set(API_CALLS)


def test_only_the_scalers_pods_mount_its_token():
    [account] = objects("ServiceAccount")
    [scaler] = [d for d in objects("Deployment") if d["metadata"]["name"] == account["metadata"]["name"]]
    assert account["automountServiceAccountToken"] is False
    assert scaler["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert scaler["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    [scaled_object] = objects("ScaledObject")
    assert scaled_object["metadata"]["namespace"] == objects("Role")[0]["metadata"]["namespace"]


def test_rules_pass_promtool_check_and_every_alert_has_a_unit_test():
    promtool = require("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES / "diffusion-autoscaler.rules.yaml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", "diffusion-autoscaler.rules.test.yaml"], cwd=RULES,
                          capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr
    alerts = {r["alert"] for g in yaml.safe_load((RULES / "diffusion-autoscaler.rules.yaml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    tested = {t["alertname"] for case in yaml.safe_load((RULES / "diffusion-autoscaler.rules.test.yaml").read_text())["tests"]
              for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert alerts == tested


def test_the_scrape_jobs_pass_promtool_with_static_targets_in_place_of_discovery(tmp_path):
    # Debian's Prometheus is built without Kubernetes discovery; everything else is checked.
    promtool = require("promtool")
    config = yaml.safe_load((MANIFESTS / "monitoring" / "prometheus" / "scrape-configs.yaml").read_text())
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        job["static_configs"] = [{"targets": ["127.0.0.1:9"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump({"global": {"scrape_interval": "15s"}, **config}))
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_monitoring_files_are_up_to_date():
    spec = importlib.util.spec_from_file_location("genmonitoring", ROOT / "tools" / "genmonitoring.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OUT.read_text() == module.render(), "run python tools/genmonitoring.py"
    assert module.PROMETHEUS_RULE.read_text() == module.render_prometheus_rule(), "run python tools/genmonitoring.py"


def test_the_dashboard_is_well_formed_and_ships_as_a_sidecar_configmap():
    dashboard = json.loads((MANIFESTS / "monitoring" / "dashboards" / "diffusion-autoscaler.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 9
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])
        assert panel["datasource"]["uid"] == "${datasource}"
    [configmap] = objects("ConfigMap", "monitoring/dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["diffusion-autoscaler.json"]) == dashboard


def test_every_promql_expression_names_only_metrics_of_the_contract():
    """Every metric a rule or a dashboard panel reads is one `contract.names` defines (which the
    worker, the exporter and the scaler register under), or a recording rule of ours."""
    from contract import names

    served = set(names.ALL_METRICS) | {"up"}
    rules = yaml.safe_load((RULES / "diffusion-autoscaler.rules.yaml").read_text())
    served |= {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    expressions = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((MANIFESTS / "monitoring" / "dashboards" / "diffusion-autoscaler.json").read_text())
    expressions += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    expressions += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    read = set()
    for expr in expressions:
        for name in re.findall(r"\b((?:deployment:)?(?:diffusion|scaler|gpu_exporter|DCGM_FI)_[A-Za-z0-9_:]*)", expr):
            read.add(name)
            base = re.sub(r"_(bucket|sum|count|total)$", "", name)
            assert name in served or base in served, f"{name} in {expr!r} is not a metric of contract.names"
    # the scan is not vacuous: the queue, the GPU and the latency signals are all read
    assert {"DCGM_FI_DEV_GPU_UTIL", "diffusion_requests_in_flight", "diffusion_request_duration_seconds_bucket"} <= read


# -- issue 17: who may reach what, and the scaler's safe defaults ------------------------------------

PROMETHEUS_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                   "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}


def ingress_by_port(policy: dict) -> dict[int, list[dict]]:
    """port -> the peers allowed to reach it."""
    allowed: dict[int, list[dict]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            allowed.setdefault(port["port"], []).extend(rule["from"])
    return allowed


@pytest.mark.parametrize("kustomization", ["base", "overlays/queue", "overlays/tls"])
def test_only_keda_reaches_the_scalers_grpc_port_and_only_prometheus_its_metrics(kustomization):
    [scaler] = [d for d in objects("Deployment", kustomization) if d["metadata"]["name"] == "diffusion-scaler"]
    ports = {p["name"]: p["containerPort"] for p in container(scaler, "scaler")["ports"]}
    [policy] = [p for p in objects("NetworkPolicy", kustomization) if p["metadata"]["name"] == "diffusion-scaler"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= scaler["spec"]["template"]["metadata"]["labels"].items()
    assert ingress_by_port(policy) == {
        ports["grpc"]: [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
                         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}}}],
        ports["metrics"]: [PROMETHEUS_PEER],
    }


@pytest.mark.parametrize("kustomization, api_open", [("base", True), ("overlays/queue", False)])
def test_the_workers_metrics_are_prometheus_only_and_a_pull_worker_takes_no_calls(kustomization, api_open):
    [worker] = [d for d in objects("Deployment", kustomization) if d["metadata"]["name"] == "sd-worker"]
    ports = {p["name"]: p["containerPort"] for c in worker["spec"]["template"]["spec"]["containers"]
             for p in c.get("ports", [])}
    [policy] = [p for p in objects("NetworkPolicy", kustomization) if p["metadata"]["name"] == "sd-worker"]
    allowed = ingress_by_port(policy)
    assert allowed[ports["metrics"]] == [PROMETHEUS_PEER]
    assert allowed[ports["http"]] == ([{"namespaceSelector": {}}] if api_open else [PROMETHEUS_PEER])


@pytest.mark.parametrize("kustomization", ["base", "overlays/queue", "overlays/tls"])
def test_the_shipped_scaler_binds_its_credentials_to_its_own_backends_and_refuses_other_addresses(kustomization):
    config = shipped_scaler_config(kustomization)
    [scaled_object] = objects("ScaledObject", kustomization)
    metadata = scaled_object["spec"]["triggers"][0]["metadata"]
    assert config.prometheus_address == metadata["prometheusAddress"]
    assert config.allowed_prometheus_urls == (config.prometheus_address,)
    assert not config.allow_cross_namespace
    if "redisAddress" in metadata:
        [scaler] = [d for d in objects("Deployment", kustomization) if d["metadata"]["name"] == "diffusion-scaler"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(scaler, "scaler")["env"] if "valueFrom" in e}
        # the password and the address it may go to come from one Secret: they cannot disagree
        assert refs["SCALER_REDIS_ADDRESS"]["name"] == refs["SCALER_REDIS_PASSWORD"]["name"]


def test_the_tls_overlay_runs_keda_to_scaler_over_mutual_tls_from_cert_manager():
    built = build("overlays/tls")
    [scaler] = [d for d in objects("Deployment", "overlays/tls") if d["metadata"]["name"] == "diffusion-scaler"]
    main = container(scaler, "scaler")
    variables = env(main)
    mount = next(m["mountPath"] for m in main["volumeMounts"] if m["name"] == "tls")
    assert variables["SCALER_TLS_CERT_FILE"] == f"{mount}/tls.crt" and variables["SCALER_TLS_KEY_FILE"] == f"{mount}/tls.key"
    assert variables["SCALER_TLS_CLIENT_CA_FILE"] == f"{mount}/ca.crt"  # mutual: KEDA must present its certificate
    assert "grpc" not in main["readinessProbe"]  # the kubelet's gRPC probe has no client certificate
    [volume] = [v for v in scaler["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    certificates = {o["metadata"]["name"]: o for o in built if o["kind"] == "Certificate"}
    [server] = [c for c in certificates.values() if c["spec"]["secretName"] == volume["secret"]["secretName"]]
    [scaled_object] = objects("ScaledObject", "overlays/tls")
    [trigger] = scaled_object["spec"]["triggers"]
    host = trigger["metadata"]["scalerAddress"].rsplit(":", 1)[0]
    assert host in server["spec"]["dnsNames"] and "server auth" in server["spec"]["usages"]
    [auth] = [o for o in built if o["kind"] == "TriggerAuthentication"
              and o["metadata"]["name"] == trigger["authenticationRef"]["name"]]
    parameters = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(parameters) == {"caCert", "tlsClientCert", "tlsClientKey"}
    [client] = [c for c in certificates.values() if c["spec"]["secretName"] == parameters["tlsClientCert"]["name"]]
    assert "client auth" in client["spec"]["usages"]
    assert client["spec"]["issuerRef"] == server["spec"]["issuerRef"]  # one CA signs both


@pytest.mark.parametrize("kustomization, name, program", [("base", "sd-worker", "worker"),
                                                          ("overlays/queue", "sd-worker", "worker"),
                                                          ("overlays/queue", "diffusion-gateway", "gateway")])
def test_the_shipped_apis_want_a_key_from_a_mounted_secret(kustomization, name, program):
    """A mounted Secret, not a variable: a changed Secret reaches the file, and the key rotates
    without a restart (contract/apikey.py)."""
    [deployment] = [d for d in objects("Deployment", kustomization) if d["metadata"]["name"] == name]
    main = container(deployment, program)
    path = env(main)[f"{program.upper()}_API_KEY_FILE"]
    [mount] = [m for m in main["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "diffusion-api-key" and mount["readOnly"]
    assert f"{program.upper()}_API_KEY" not in env(main)
