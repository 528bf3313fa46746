"""The deployment files in cluster/ are valid and agree with each other and with the repo.

What is checked against what:

* Ray cluster launcher YAMLs (cluster/aws.yaml, cluster/gcp.yaml): Ray's own schema
  (``ray/autoscaler/ray-schema.json`` through ``prepare_config`` + ``validate_config``), then the
  fields rlora relies on (CPU head, autoscaling GPU groups, dashboard on 127.0.0.1, image).
* Core Kubernetes kinds (ConfigMap, PersistentVolumeClaim, CronJob) and every pod template inside
  the KubeRay resources: the Kubernetes OpenAPI schemas shipped by ``kubernetes-validate``
  (strict mode: unknown fields are errors).
* KubeRay kinds (RayCluster, RayJob, RayCronJob; ray.io/v1, KubeRay 1.6): a structural check of
  their fields against the field sets of KubeRay's API types.
* Cross-file: every repo path named anywhere in cluster/ exists; every run config a manifest
  trains with validates against rlora's config schema (with the command's dotted overrides);
  GPU/CPU per pod fit ``ray.resources_per_worker`` and the cluster can host ``ray.num_workers``;
  one image and one Ray version everywhere; nightly schedules are valid 5-field crons that agree.
"""
from __future__ import annotations

import importlib
import copy
import posixpath
import re
import urllib.parse
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11")

try:  # tests/ laid out as packages
    from . import manifest_checks as mc
except ImportError:  # plain test directories (pytest's default rootdir-relative import)
    import manifest_checks as mc

from rlora.config import apply_overrides, validate_config

REPO, CLUSTER = mc.REPO, mc.CLUSTER
K8S_VERSION = "1.29"  # oldest Kubernetes the manifests target (CronJob.timeZone is GA since 1.27)
RAY_CONTAINERS = {"ray-head", "ray-worker"}
# The rlora CLI surface the manifests use: subcommand -> (allowed flags, required flags).
RLORA_CLI = {
    "submit": ({"--address", "--wait"}, {"--address", "--wait"}),
    "register": ({"--name", "--alias"}, {"--name", "--alias"}),
    "export": ({"--task", "--format", "--out"}, {"--format", "--out"}),
}

# Fields of the KubeRay ray.io/v1 types (KubeRay 1.6): anything else is a typo or a newer field.
RAYCLUSTER_SPEC = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "workerGroupSpecs",
}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
    "template", "scaleStrategy", "numOfHosts", "suspend",
}
AUTOSCALER_OPTIONS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode",
    "env", "envFrom", "volumeMounts", "version",
}
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}
RAYCRONJOB_SPEC = {"schedule", "suspend", "jobTemplate"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def docs_of(path: Path) -> tuple[dict, ...]:
    """The documents of a YAML file; () when it does not parse (test_yaml_parses reports that)."""
    try:
        return tuple(mc.load_docs(path))
    except mc.ManifestError:
        return ()


def launcher_files() -> list[Path]:
    return [p for p in mc.yaml_files() if any("available_node_types" in d for d in docs_of(p))]


def k8s_docs(kind: str | None = None) -> list[tuple[Path, dict]]:
    out = []
    for p in mc.yaml_files():
        for d in docs_of(p):
            if "apiVersion" in d and (kind is None or d.get("kind") == kind):
                out.append((p, d))
    return out


def by_name(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in k8s_docs(kind)}


def doc_id(item: tuple[Path, dict]) -> str:
    path, doc = item
    return f"{mc.rel(path)}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def ray_jobs() -> list[tuple[str, dict]]:
    """(label, RayJob spec) for every RayJob and every RayCronJob's job template."""
    out = [(doc_id((p, d)), d.get("spec") or {}) for p, d in k8s_docs("RayJob")]
    out += [(doc_id((p, d)) + ".jobTemplate", (d.get("spec") or {}).get("jobTemplate") or {}) for p, d in k8s_docs("RayCronJob")]
    return out


def cluster_specs() -> list[tuple[str, dict, str | None]]:
    """(label, RayCluster spec, name of a standalone RayCluster or None) for every cluster spec."""
    out = [(doc_id((p, d)), d.get("spec") or {}, d["metadata"].get("name")) for p, d in k8s_docs("RayCluster")]
    out += [(label + ".rayClusterSpec", spec["rayClusterSpec"], None) for label, spec in ray_jobs() if "rayClusterSpec" in spec]
    return out


def pod_templates() -> list[tuple[str, dict]]:
    """(label, pod template) of every Ray pod (head, worker groups, submitter) of the KubeRay kinds."""
    out = []
    for label, spec, _ in cluster_specs():
        out.append((label + ".headGroupSpec", (spec.get("headGroupSpec") or {}).get("template") or {}))
        for g in spec.get("workerGroupSpecs") or []:
            out.append((f"{label}.workerGroupSpecs[{g.get('groupName')}]", g.get("template") or {}))
    for label, spec in ray_jobs():
        if "submitterPodTemplate" in spec:
            out.append((label + ".submitterPodTemplate", spec["submitterPodTemplate"]))
    return out


def dockerfile() -> list[tuple[str, str]]:
    return mc.dockerfile_instructions((CLUSTER / "Dockerfile").read_text(encoding="utf-8"))


def image_workdir() -> str:
    return [a for w, a in dockerfile() if w == "WORKDIR"][-1]


def crontab_entries() -> list[tuple[int, str, str]]:
    """(line number, schedule, command) of every job line of cluster/crontab.example."""
    out = []
    for n, line in enumerate((CLUSTER / "crontab.example").read_text(encoding="utf-8").splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#") or re.match(r"^[A-Za-z_][A-Za-z0-9_]*\s*=", s):
            continue
        parts = s.split(None, 5)
        if len(parts) < 6:
            raise mc.ManifestError(f"cluster/crontab.example:{n}: expected 5 schedule fields and a command")
        out.append((n, " ".join(parts[:5]), parts[5]))
    return out


def crontab_env() -> dict[str, str]:
    env = {}
    for line in (CLUSTER / "crontab.example").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$", line)
        if m:
            env[m.group(1)] = m.group(2).strip()
    return env


# --------------------------------------------------------------------------------------------
# Invocations: every place a manifest runs training / the rlora CLI
# --------------------------------------------------------------------------------------------
class Invocation:
    """One command a manifest runs, where its paths resolve, and the cluster it trains on."""

    def __init__(self, where, argv, pod_spec=None, cluster=None):
        self.where = where
        self.argv = argv
        self.pod_spec = pod_spec  # paths resolve in this pod; None: relative to the repo root
        self.cluster = cluster  # ("kuberay", spec, autoscaling) or ("launcher", cfg) or None

    @property
    def kind(self) -> str:
        prog = mc.program(self.argv)
        if prog.startswith("python") and len(self.argv) > 1 and self.argv[1].endswith("jobs/train.py"):
            return "train"
        if prog == "rlora" and len(self.argv) > 1:
            return "rlora " + self.argv[1]
        return ""

    def __repr__(self):
        return f"{self.where}: {' '.join(self.argv)}"


def _invocations_of(where, script_cmds, pod_spec, cluster) -> list[Invocation]:
    invs = [Invocation(where, argv, pod_spec, cluster) for argv in script_cmds]
    return [i for i in invs if i.kind]


def _raycluster_for_address(address: str) -> dict | None:
    host = urllib.parse.urlparse(address).hostname or ""
    for name, doc in by_name("RayCluster").items():
        if host.split(".")[0] == f"{name}-head-svc":
            return doc
    return None


BROKEN: list[str] = []  # commands that could not be parsed (reported by test_invocations_found)


@lru_cache(maxsize=None)
def invocations() -> tuple[Invocation, ...]:
    try:
        return tuple(_collect_invocations())
    except (mc.ManifestError, KeyError, TypeError, IndexError) as err:
        BROKEN.append(f"{type(err).__name__}: {err}")
        return ()


def _collect_invocations() -> list[Invocation]:
    out: list[Invocation] = []
    for label, spec in ray_jobs():
        cluster = spec.get("rayClusterSpec")
        head = cluster["headGroupSpec"]["template"]["spec"] if cluster else None
        target = ("kuberay", cluster, False) if cluster else None
        out += _invocations_of(label, mc.simple_commands(spec.get("entrypoint") or ""), head, target)
    for path, doc in k8s_docs("CronJob"):
        pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        for c in pod["containers"]:
            cmds = mc.expand_shell(list(c.get("command") or []) + list(c.get("args") or []))
            for inv in _invocations_of(doc_id((path, doc)), cmds, pod, None):
                address = mc.option(inv.argv, "--address")
                rc = _raycluster_for_address(address) if address else None
                if rc is not None:
                    inv.cluster = ("kuberay", rc["spec"], bool(rc["spec"].get("enableInTreeAutoscaling")))
                out.append(inv)
    for n, _, command in crontab_entries():
        cmds = mc.simple_commands(command.replace("\\%", "%"))
        out += _invocations_of(f"cluster/crontab.example:{n}", cmds, None, None)
    for path in launcher_files():
        cfg = docs_of(path)[0]
        for key, line in ((cfg.get("metadata") or {}).get("rlora") or {}).items():
            if key.endswith(("entrypoint", "submit")):
                out += _invocations_of(f"{mc.rel(path)}:metadata.rlora.{key}", mc.simple_commands(line), None, ("launcher", cfg))
    return out


def training_invocations() -> list[Invocation]:
    return [i for i in invocations() if i.kind in ("train", "rlora submit")]


def config_arg(inv: Invocation) -> str:
    if inv.kind == "train":
        path = mc.option(inv.argv, "--config")
        if path is None:
            raise mc.ManifestError(f"{inv.where}: jobs/train.py is run without --config")
        return path
    value_flags = {"--address", "--name", "--alias", "--task", "--format", "--out"}
    positional, skip = [], False
    for tok in inv.argv[2:]:
        if skip:
            skip = False
        elif tok in value_flags:
            skip = True
        elif not tok.startswith("-") and "=" not in tok:
            positional.append(tok)
    if not positional:
        raise mc.ManifestError(f"{inv.where}: rlora submit is given no CONFIG.yaml")
    return positional[0]


def config_text(inv: Invocation) -> tuple[str, str]:
    """(source label, YAML text) of the run config the invocation trains with."""
    path = config_arg(inv)
    if inv.pod_spec is None:
        f = REPO / path
        if not f.is_file():
            raise mc.ManifestError(f"{inv.where}: config {path} does not exist in the repo: add it or fix the path")
        return path, f.read_text(encoding="utf-8")
    mount = mc.find_mount(inv.pod_spec, path)
    if mount is None:
        workdir = image_workdir()
        if path.startswith(workdir + "/") and (REPO / path[len(workdir) + 1:]).is_file():
            return path, (REPO / path[len(workdir) + 1:]).read_text(encoding="utf-8")
        raise mc.ManifestError(f"{inv.where}: config {path} is on no volume of the pod and not in the image")
    if "configMap" not in mount.volume:
        raise mc.ManifestError(f"{inv.where}: config {path} is on volume {mount.volume['name']!r}, not a ConfigMap")
    name = mount.volume["configMap"]["name"]
    return f"ConfigMap {name}:{mount.key}", mc.configmap_text(mount.volume, mount.key, by_name("ConfigMap"))


def run_config(inv: Invocation):
    """The validated rlora RunConfig (overrides applied; shell variables given stand-in values)."""
    source, text = config_text(inv)
    raw = yaml.safe_load(text) or {}
    overrides = [mc.substitute_vars(o) for o in mc.dotted_overrides(inv.argv)]
    return validate_config(apply_overrides(raw, overrides), f"{source} (used by {inv.where})")


# ============================================================================================
# Every YAML parses and is a known kind
# ============================================================================================
@pytest.mark.parametrize("path", mc.yaml_files(), ids=mc.rel)
def test_yaml_parses_and_is_a_known_kind(path):
    docs = mc.load_docs(path)
    assert docs, f"{mc.rel(path)} has no documents"
    for doc in docs:
        assert ("apiVersion" in doc) != ("available_node_types" in doc), (
            f"{mc.rel(path)}: a document is neither a Kubernetes object (apiVersion/kind) nor a Ray launcher config"
        )


def test_expected_files_present():
    names = {mc.rel(p) for p in CLUSTER.rglob("*") if p.is_file()}
    for need in ("cluster/aws.yaml", "cluster/gcp.yaml", "cluster/Dockerfile", "cluster/README.md", "cluster/crontab.example"):
        assert need in names, f"{need} is missing"
    kinds = {d["kind"] for _, d in k8s_docs()}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ConfigMap"} <= kinds, kinds


# ============================================================================================
# Ray cluster launcher YAMLs
# ============================================================================================
@pytest.mark.parametrize("path", launcher_files(), ids=mc.rel)
def test_launcher_passes_ray_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config as ray_validate

    cfg = docs_of(path)[0]
    ray_validate(prepare_config(copy.deepcopy(cfg)))


def test_ray_schema_check_rejects_a_broken_launcher():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config as ray_validate

    cfg = copy.deepcopy(docs_of(launcher_files()[0])[0])
    worker = next(k for k in cfg["available_node_types"] if k != cfg["head_node_type"])
    cfg["available_node_types"][worker]["resources"] = {"GPU": "one"}
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(prepare_config(cfg))


@pytest.mark.parametrize("path", launcher_files(), ids=mc.rel)
def test_launcher_layout(path):
    cfg = docs_of(path)[0]
    where = mc.rel(path)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers", "docker"):
        assert key in cfg, f"{where}: missing top-level {key}"
    assert cfg["provider"]["type"] == path.stem, f"{where}: provider.type should be {path.stem}"
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types, f"{where}: head_node_type {head!r} is not in available_node_types"
    assert types[head]["resources"].get("GPU", 0) == 0, f"{where}: the head should be a CPU node"
    workers = {k: v for k, v in types.items() if k != head}
    gpu_types = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    assert gpu_types, f"{where}: no GPU worker node type"
    for name, node in workers.items():
        assert "resources" in node and "node_config" in node, f"{where}: {name} needs resources and node_config"
        lo, hi = node.get("min_workers", 0), node.get("max_workers")
        assert hi is not None, f"{where}: {name} has no max_workers"
        assert 0 <= lo <= hi, f"{where}: {name}: need 0 <= min_workers ({lo}) <= max_workers ({hi})"
        assert node["resources"].get("CPU", 0) > 0, f"{where}: {name} declares no CPUs"
    assert any(n.get("min_workers", 0) < n["max_workers"] for n in gpu_types.values()), f"{where}: GPU groups do not autoscale"
    assert sum(n["max_workers"] for n in workers.values()) <= cfg["max_workers"], (
        f"{where}: per-type max_workers add up to more than the global max_workers"
    )


@pytest.mark.parametrize("path", launcher_files(), ids=mc.rel)
def test_launcher_start_commands(path):
    cfg = docs_of(path)[0]
    where = mc.rel(path)
    head = " ".join(cfg["head_start_ray_commands"])
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "--head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head, where
    assert "--dashboard-host=127.0.0.1" in head, f"{where}: bind the dashboard to 127.0.0.1 (reach it with `ray dashboard`)"
    port = re.search(r"--port=(\d+)", head)
    assert port, f"{where}: head start command sets no --port"
    assert f"--address=$RAY_HEAD_IP:{port.group(1)}" in workers, f"{where}: workers must join the head's GCS port {port.group(1)}"
    mlflow = re.search(r"MLFLOW_TRACKING_URI=(\S+)", " ".join(cfg.get("setup_commands") or []))
    assert mlflow and mlflow.group(1).startswith(("http://", "https://")), (
        f"{where}: setup_commands must export MLFLOW_TRACKING_URI=http(s)://... (a server every node reaches)"
    )


@pytest.mark.parametrize("path", launcher_files(), ids=mc.rel)
def test_launcher_file_mounts_exist(path):
    cfg = docs_of(path)[0]
    for remote, local in (cfg.get("file_mounts") or {}).items():
        assert (REPO / local).exists(), f"{mc.rel(path)}: file_mounts {remote!r} -> {local!r} does not exist in the repo"


# ============================================================================================
# Kubernetes objects: common fields, schemas of core kinds and pod templates
# ============================================================================================
@pytest.mark.parametrize("item", k8s_docs(), ids=doc_id)
def test_k8s_object_has_required_fields(item):
    path, doc = item
    where = doc_id(item)
    assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str), where
    name = (doc.get("metadata") or {}).get("name")
    assert isinstance(name, str) and DNS_LABEL.match(name) and len(name) <= 63, f"{where}: metadata.name must be a DNS label"
    body = "data" if doc["kind"] == "ConfigMap" else "spec"
    assert isinstance(doc.get(body), dict) and doc[body], f"{where}: missing {body}"
    if doc["kind"] in ("RayCluster", "RayJob", "RayCronJob"):
        assert doc["apiVersion"] == "ray.io/v1", f"{where}: KubeRay kinds are ray.io/v1"


CORE_KINDS = {"ConfigMap", "PersistentVolumeClaim", "CronJob", "Job", "Secret", "Service"}


@pytest.mark.parametrize("item", [i for i in k8s_docs() if i[1]["kind"] in CORE_KINDS], ids=doc_id)
def test_core_kind_matches_kubernetes_schema(item):
    kv = importlib.import_module("kubernetes_validate.utils")  # a dev dependency: never skipped
    kv.validate(item[1], K8S_VERSION, strict=True)


@pytest.mark.parametrize("label,template", pod_templates(), ids=[p[0] for p in pod_templates()])
def test_pod_template_matches_kubernetes_schema(label, template):
    kv = importlib.import_module("kubernetes_validate.utils")  # a dev dependency: never skipped
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    kv.validate(wrapped, K8S_VERSION, strict=True)


def test_kubernetes_schema_check_rejects_typos():
    kv = importlib.import_module("kubernetes_validate.utils")  # a dev dependency: never skipped
    cron = copy.deepcopy(k8s_docs("CronJob")[0][1])
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(cron, K8S_VERSION, strict=True)
    _, template = pod_templates()[0]
    bad = copy.deepcopy(template)
    bad["spec"]["containers"][0]["env"] = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}  # must be a list
    with pytest.raises(kv.ValidationError):
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": bad}, K8S_VERSION, strict=True)


@pytest.mark.parametrize("label,template", pod_templates(), ids=[p[0] for p in pod_templates()])
def test_pod_volumes_resolve(label, template):
    spec = template["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    configmaps, claims = by_name("ConfigMap"), by_name("PersistentVolumeClaim")
    for c in spec["containers"]:
        for m in c.get("volumeMounts") or []:
            assert m["name"] in volumes, f"{label}: volumeMount {m['name']!r} has no volume"
    for v in volumes.values():
        if "configMap" in v:
            assert v["configMap"]["name"] in configmaps, f"{label}: ConfigMap {v['configMap']['name']!r} is defined nowhere in cluster/"
        if "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"]["claimName"]
            assert claim in claims, f"{label}: PersistentVolumeClaim {claim!r} is defined nowhere in cluster/"
            assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], f"{label}: shared claim {claim!r} must be ReadWriteMany"


# ============================================================================================
# KubeRay kinds
# ============================================================================================
def _unknown(where: str, mapping: dict, allowed: set[str]) -> None:
    extra = sorted(set(mapping) - allowed)
    assert not extra, f"{where}: unknown field(s) {extra} (KubeRay ray.io/v1 has {sorted(allowed)})"


def check_cluster_spec(label: str, spec: dict) -> None:
    _unknown(label, spec, RAYCLUSTER_SPEC)
    assert "headGroupSpec" in spec, f"{label}: missing headGroupSpec"
    _unknown(label + ".headGroupSpec", spec["headGroupSpec"], HEAD_GROUP)
    _unknown(label + ".autoscalerOptions", spec.get("autoscalerOptions") or {}, AUTOSCALER_OPTIONS)
    mode = (spec.get("authOptions") or {}).get("mode", "disabled")
    assert mode in ("disabled", "token"), f"{label}: authOptions.mode must be disabled or token"
    upscaling = (spec.get("autoscalerOptions") or {}).get("upscalingMode", "Default")
    assert upscaling in ("Default", "Aggressive", "Conservative"), f"{label}: bad upscalingMode {upscaling!r}"
    groups = [("headGroupSpec", spec["headGroupSpec"])]
    workers = spec.get("workerGroupSpecs") or []
    assert workers, f"{label}: no workerGroupSpecs"
    names = [g.get("groupName") for g in workers]
    assert len(set(names)) == len(names) and all(names), f"{label}: groupName must be set and unique: {names}"
    for g in workers:
        where = f"{label}.workerGroupSpecs[{g['groupName']}]"
        _unknown(where, g, WORKER_GROUP)
        lo, hi, n = g.get("minReplicas", 0), g.get("maxReplicas"), g.get("replicas", 0)
        assert hi is not None, f"{where}: set maxReplicas"
        assert 0 <= lo <= n <= hi, f"{where}: need minReplicas ({lo}) <= replicas ({n}) <= maxReplicas ({hi})"
        groups.append((f"workerGroupSpecs[{g['groupName']}]", g))
    for gname, g in groups:
        where = f"{label}.{gname}"
        assert "rayStartParams" in g, f"{where}: rayStartParams is required (use {{}})"
        bad = {k: v for k, v in g["rayStartParams"].items() if not isinstance(v, str)}
        assert not bad, f"{where}: rayStartParams values must be strings (quote them): {bad}"
        containers = g["template"]["spec"]["containers"]
        assert containers[0]["name"] in RAY_CONTAINERS, f"{where}: the Ray container must come first"
        for c in containers:
            res = c.get("resources") or {}
            req, lim = (res.get("requests") or {}), (res.get("limits") or {})
            if "nvidia.com/gpu" in req:
                assert "nvidia.com/gpu" in lim and mc.quantity(req["nvidia.com/gpu"]) == mc.quantity(lim["nvidia.com/gpu"]), (
                    f"{where}: nvidia.com/gpu requests must equal limits"
                )
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert mc.limit(head, "nvidia.com/gpu") == 0, f"{label}: the head pod should not take a GPU"
    ports = {p.get("name"): p["containerPort"] for p in head.get("ports") or []}
    assert ports.get("dashboard") == 8265, f"{label}: the head must expose the dashboard/Jobs API port 8265 as 'dashboard'"
    assert any(mc.limit(g["template"]["spec"]["containers"][0], "nvidia.com/gpu") > 0 for g in workers), (
        f"{label}: no worker group has an nvidia.com/gpu limit"
    )


@pytest.mark.parametrize("label,spec,name", cluster_specs(), ids=[c[0] for c in cluster_specs()])
def test_ray_cluster_spec(label, spec, name):
    check_cluster_spec(label, spec)
    if name is not None:  # a standalone, long-lived RayCluster
        assert spec.get("enableInTreeAutoscaling") is True, f"{label}: a long-lived cluster should autoscale"
        gpu = [g for g in spec["workerGroupSpecs"] if mc.limit(g["template"]["spec"]["containers"][0], "nvidia.com/gpu") > 0]
        assert any(g.get("minReplicas", 0) < g["maxReplicas"] for g in gpu), f"{label}: GPU group min == max: nothing to autoscale"
        assert len(f"{name}-head-svc") <= 63, f"{label}: the head service name {name}-head-svc exceeds 63 characters"


def test_cluster_spec_check_rejects_typos():
    label, spec, _ = cluster_specs()[0]
    bad = copy.deepcopy(spec)
    bad["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(AssertionError, match="maxReplica"):
        check_cluster_spec(label, bad)
    bad = copy.deepcopy(spec)
    bad["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    with pytest.raises(AssertionError, match="strings"):
        check_cluster_spec(label, bad)


def check_ray_job_spec(label: str, spec: dict) -> None:
    _unknown(label, spec, RAYJOB_SPEC)
    assert isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip(), f"{label}: missing entrypoint"
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), f"{label}: set exactly one of rayClusterSpec / clusterSelector"
    ops = mc.top_level_operators(spec["entrypoint"])
    assert not ops, (
        f"{label}: entrypoint has unquoted shell operators {ops}: KubeRay pastes it into the submitter's shell line, "
        f"so they would run in the submitter pod; wrap the chain in bash -c '...'"
    )
    if "runtimeEnvYAML" in spec:
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert isinstance(env, dict), f"{label}: runtimeEnvYAML must be a YAML mapping"
        if "working_dir" in env:
            assert env["working_dir"] == image_workdir(), (
                f"{label}: runtimeEnvYAML working_dir {env['working_dir']!r} should be the image's WORKDIR {image_workdir()!r}"
            )
    if spec.get("shutdownAfterJobFinishes"):
        assert "rayClusterSpec" in spec, f"{label}: shutdownAfterJobFinishes only applies to a RayJob's own cluster"


@pytest.mark.parametrize("label,spec", ray_jobs(), ids=[j[0] for j in ray_jobs()])
def test_ray_job_spec(label, spec):
    check_ray_job_spec(label, spec)
    trains = [i for i in invocations() if i.where == label and i.kind == "train"]
    assert trains, f"{label}: the entrypoint does not run python jobs/train.py --config ..."


def test_ray_job_check_rejects_unquoted_chains():
    label, spec = ray_jobs()[0]
    bad = copy.deepcopy(spec)
    bad["entrypoint"] = "cd /tmp && python jobs/train.py --config /configs/train.yaml"
    with pytest.raises(AssertionError, match="operators"):
        check_ray_job_spec(label, bad)
    bad = copy.deepcopy(spec)
    bad["clusterSelector"] = {"ray.io/cluster": "raycluster"}
    with pytest.raises(AssertionError, match="exactly one"):
        check_ray_job_spec(label, bad)


@pytest.mark.parametrize("item", k8s_docs("RayCronJob"), ids=doc_id)
def test_ray_cron_job(item):
    _, doc = item
    where = doc_id(item)
    _unknown(where + ".spec", doc["spec"], RAYCRONJOB_SPEC)
    schedule = mc.parse_cron(doc["spec"]["schedule"])
    assert schedule.runs_once_a_day(), f"{where}: a nightly schedule should fire once a day, got {doc['spec']['schedule']!r}"
    assert isinstance(doc["spec"]["jobTemplate"], dict), f"{where}: jobTemplate must be a RayJob spec"
    cmds = [i for i in invocations() if i.where == where + ".jobTemplate"]
    kinds = [i.kind for i in cmds]
    assert "train" in kinds and "rlora register" in kinds, f"{where}: the nightly job should train then register: {kinds}"
    assert kinds.index("train") < kinds.index("rlora register"), f"{where}: register must come after training"
    register = cmds[kinds.index("rlora register")]
    assert mc.option(register.argv, "--alias") == "champion", f"{where}: promote with --alias champion"


# ============================================================================================
# Schedules: Kubernetes CronJob, crontab, and their agreement with the RayCronJob
# ============================================================================================
@pytest.mark.parametrize("item", k8s_docs("CronJob"), ids=doc_id)
def test_cron_job(item):
    _, doc = item
    where = doc_id(item)
    spec = doc["spec"]
    assert mc.parse_cron(spec["schedule"]).runs_once_a_day(), f"{where}: nightly schedule expected"
    assert spec.get("concurrencyPolicy") == "Forbid", f"{where}: concurrencyPolicy: Forbid (two nightly runs must not overlap)"
    if "timeZone" in spec:
        import zoneinfo

        if zoneinfo.available_timezones():
            zoneinfo.ZoneInfo(spec["timeZone"])  # raises on an unknown zone
    submits = [i for i in invocations() if i.where == where and i.kind == "rlora submit"]
    assert submits, f"{where}: the CronJob should run rlora submit"
    for inv in submits:
        address = mc.option(inv.argv, "--address")
        assert address, f"{where}: rlora submit needs --address"
        url = urllib.parse.urlparse(address)
        assert url.scheme == "http" and url.port == 8265, f"{where}: --address should be http://<cluster>-head-svc:8265"
        rc = _raycluster_for_address(address)
        assert rc is not None, f"{where}: {address} names no RayCluster defined in cluster/ (<name>-head-svc)"
        if (rc["spec"].get("authOptions") or {}).get("mode") == "token":
            container = next(c for c in inv.pod_spec["containers"])
            mode = mc.env_value(container, "RAY_AUTH_MODE")
            token = mc.env_value(container, "RAY_AUTH_TOKEN")
            assert mode and mode.get("value") == "token", f"{where}: the cluster uses token auth: set RAY_AUTH_MODE=token"
            ref = ((token or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            assert ref.get("name") == rc["metadata"]["name"] and ref.get("key") == "auth_token", (
                f"{where}: RAY_AUTH_TOKEN must come from Secret {rc['metadata']['name']!r} key auth_token (created by KubeRay)"
            )


def test_crontab_lines():
    entries = crontab_entries()
    assert entries, "cluster/crontab.example has no job line"
    for n, schedule, command in entries:
        mc.parse_cron(schedule)
        assert not re.search(r"(?<!\\)%", command), (
            f"cluster/crontab.example:{n}: cron turns an unescaped % into a newline: write \\%"
        )
    assert crontab_env().get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")), (
        "cluster/crontab.example: set MLFLOW_TRACKING_URI=http(s)://... for the jobs"
    )


def test_nightly_schedules_agree():
    schedules = {doc_id(i): i[1]["spec"]["schedule"] for i in k8s_docs("RayCronJob") + k8s_docs("CronJob")}
    schedules.update({f"cluster/crontab.example:{n}": s for n, s, _ in crontab_entries()})
    parsed = {k: mc.parse_cron(v) for k, v in schedules.items()}
    assert len(set(parsed.values())) == 1, f"the nightly schedules differ: {schedules}"


# ============================================================================================
# Commands and configs: what the manifests run
# ============================================================================================
def test_invocations_found():
    invocations()
    assert not BROKEN, BROKEN
    kinds = {i.kind for i in invocations()}
    assert {"train", "rlora submit", "rlora register"} <= kinds, kinds


@pytest.mark.parametrize("inv", invocations(), ids=repr)
def test_rlora_cli_usage(inv):
    if inv.kind == "train":
        assert inv.argv[1] == "jobs/train.py", f"{inv.where}: run the entrypoint as python jobs/train.py (relative to the repo)"
        assert mc.option(inv.argv, "--config"), f"{inv.where}: jobs/train.py needs --config"
        return
    sub = inv.argv[1]
    assert sub in RLORA_CLI, f"{inv.where}: unknown rlora subcommand {sub!r}"
    allowed, required = RLORA_CLI[sub]
    used = mc.flags(inv.argv)
    assert used <= allowed, f"{inv.where}: rlora {sub} has no option(s) {sorted(used - allowed)}"
    assert required <= used, f"{inv.where}: rlora {sub} needs {sorted(required - used)}"
    if sub == "submit":
        address = mc.option(inv.argv, "--address")
        assert urllib.parse.urlparse(address).scheme in ("http", "https"), f"{inv.where}: --address must be the dashboard URL"


SHARED_MOUNT = "/mnt/shared"  # the shared volume every manifest mounts (cluster/README.md)


@pytest.mark.parametrize("inv", training_invocations(), ids=repr)
def test_run_config_validates(inv):
    cfg = run_config(inv)
    source, _ = config_text(inv)
    if cfg.data.path and not cfg.data.path.startswith(SHARED_MOUNT + "/"):  # shared storage is not in the repo
        path = cfg.data.path
        workdir = image_workdir()
        if path.startswith(workdir + "/"):
            path = path[len(workdir) + 1:]
        base = (REPO / config_arg(inv)).parent if inv.pod_spec is None else REPO
        assert (REPO / path).exists() or (base / path).exists(), f"{source}: data.path {cfg.data.path} is not in the repo/image"


@pytest.mark.parametrize("inv", [i for i in training_invocations() if i.cluster], ids=repr)
def test_cluster_fits_the_run(inv):
    cfg = run_config(inv)
    kind = inv.cluster[0]
    if kind == "kuberay":
        _, spec, autoscaling = inv.cluster
        groups = mc.kuberay_groups(spec)
    else:
        _, launcher = inv.cluster
        groups, autoscaling = mc.launcher_groups(launcher), True
    mc.check_capacity(inv.where, cfg.ray, groups, autoscaling)


def test_capacity_check_detects_mismatch():
    inv = next(i for i in training_invocations() if i.cluster and i.cluster[0] == "kuberay")
    cfg = run_config(inv)
    spec = copy.deepcopy(inv.cluster[1])
    groups = mc.kuberay_groups(spec)
    too_many = cfg.ray.model_copy(update={"num_workers": 10_000})
    with pytest.raises(mc.ManifestError, match="capacity"):
        mc.check_capacity("x", too_many, groups, False)
    gpu = next(g for g in groups if g.gpus > 0)
    odd = cfg.ray.model_copy(update={"resources_per_worker": {"CPU": 1, "GPU": gpu.gpus * 2}})
    with pytest.raises(mc.ManifestError, match="whole number"):
        mc.check_capacity("x", odd, groups, False)


@pytest.mark.parametrize("inv", [i for i in training_invocations() if i.pod_spec is not None], ids=repr)
def test_kubernetes_runs_use_shared_storage_and_mlflow(inv):
    """Checkpoints and outputs go to storage every Ray pod shares; MLflow is a server, not a file."""
    cfg = run_config(inv)
    source, _ = config_text(inv)
    storage = cfg.ray.storage_path
    assert storage, f"{source}: set ray.storage_path (S3/GCS/NFS) so any worker can resume any checkpoint"
    pods = []
    if inv.cluster:
        spec = inv.cluster[1]
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for path in (storage, cfg.trainer.output_dir):
        if "://" in path:
            continue
        assert posixpath.isabs(path), f"{source}: {path} must be absolute (a shared mount), not relative to the job's cwd"
        for pod in pods:
            mount = mc.find_mount(pod, path)
            assert mount and "persistentVolumeClaim" in mount.volume, f"{inv.where}: {path} is not on the shared volume in every Ray pod"
    for pod in pods + [inv.pod_spec]:
        container = pod["containers"][0]
        uri = cfg.mlflow.tracking_uri or (mc.env_value(container, "MLFLOW_TRACKING_URI") or {}).get("value", "")
        host = urllib.parse.urlparse(uri).hostname
        assert uri.startswith(("http://", "https://")) and host not in ("localhost", "127.0.0.1"), (
            f"{inv.where}: container {container['name']} needs MLFLOW_TRACKING_URI=http(s)://<server every node reaches>"
        )


@pytest.mark.parametrize("inv", [i for i in invocations() if i.kind == "rlora register"], ids=repr)
def test_register_source_is_the_trained_run(inv):
    trains = [i for i in invocations() if i.where == inv.where and i.kind in ("train", "rlora submit")]
    assert trains, f"{inv.where}: rlora register with no training before it in the same command"
    train = trains[-1]
    cfg = run_config(train)
    # compare unexpanded strings: "$RUN" in the override must reappear in the register source
    overrides = dict(o.split("=", 1) for o in mc.dotted_overrides(train.argv))
    output_dir = overrides.get("trainer.output_dir", cfg.trainer.output_dir)
    run_name = overrides.get("trainer.run_name", cfg.trainer.run_name)
    assert run_name, f"{train.where}: set trainer.run_name so the output folder is known to rlora register"
    source_arg = inv.argv[2]
    assert posixpath.isabs(output_dir), f"{train.where}: trainer.output_dir must be an absolute shared path for register to find it"
    assert source_arg == posixpath.join(output_dir, run_name), (
        f"{inv.where}: register {source_arg!r} but the run writes to {posixpath.join(output_dir, run_name)!r}"
    )
    if inv.pod_spec is not None:
        mount = mc.find_mount(inv.pod_spec, output_dir)
        assert mount and "persistentVolumeClaim" in mount.volume, f"{inv.where}: {output_dir} is not mounted where register runs"


# ============================================================================================
# Paths, image and versions
# ============================================================================================
_REPO_PATH = re.compile(r"(?<![\w./$~-])(?:\./)?((?:jobs|examples|cluster|rlora|tests|benchmarks)/[\w./-]*[\w-])")


def referenced_paths() -> list[tuple[str, str]]:
    """(file, repo-relative path) for every repo path named in cluster/ (in-image paths mapped back)."""
    workdir = image_workdir()
    out = set()
    for f in sorted(p for p in CLUSTER.rglob("*") if p.is_file() and not p.name.endswith("ignore")):
        text = f.read_text(encoding="utf-8")
        for m in _REPO_PATH.finditer(text):
            out.add((mc.rel(f), m.group(1)))
        for m in re.finditer(re.escape(workdir) + r"/([\w./-]*[\w-])", text):
            out.add((mc.rel(f), m.group(1)))
    return sorted(out)


def test_referenced_paths_found():
    paths = {p for _, p in referenced_paths()}
    for need in ("jobs/train.py", "examples/configs/gpu_multinode.yaml", "examples/configs/cpu_demo.yaml"):
        assert need in paths, f"cluster/ never names {need}"


@pytest.mark.parametrize("source,path", referenced_paths(), ids=[f"{s}->{p}" for s, p in referenced_paths()])
def test_referenced_path_exists(source, path):
    assert (REPO / path).exists(), f"{source} names {path}, which does not exist in the repo"


def test_one_image_everywhere():
    images = set()
    for label, template in pod_templates():
        images |= {c["image"] for c in template["spec"]["containers"]}
    for _, doc in k8s_docs("CronJob"):
        images |= {c["image"] for c in doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]}
    for path in launcher_files():
        images.add(docs_of(path)[0]["docker"]["image"])
    assert len(images) == 1, f"use one rlora image (built from cluster/Dockerfile) everywhere: {sorted(images)}"


def test_ray_version_matches_image_and_project():
    from packaging.requirements import Requirement
    from packaging.version import Version

    args = mc.dockerfile_args(dockerfile())
    ray_version = args.get("RAY_VERSION")
    assert ray_version, "cluster/Dockerfile: declare ARG RAY_VERSION=<x.y.z>"
    for label, spec, _ in cluster_specs():
        assert spec.get("rayVersion") == ray_version, f"{label}: rayVersion {spec.get('rayVersion')!r} != Dockerfile RAY_VERSION {ray_version}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    ray_req = next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ray")
    assert Version(ray_version) in ray_req.specifier, f"Dockerfile RAY_VERSION {ray_version} does not satisfy pyproject's {ray_req}"


def test_dockerfile():
    from packaging.specifiers import SpecifierSet

    instr = dockerfile()
    args = mc.dockerfile_args(instr)
    froms = [mc.expand_args(a, args) for w, a in instr if w == "FROM"]
    assert len(froms) == 1, f"cluster/Dockerfile: expected one FROM, got {froms}"
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", froms[0])
    assert m, f"cluster/Dockerfile: base on a rayproject/ray GPU image (rayproject/ray:X.Y.Z-pyNN-gpu), got {froms[0]}"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
    assert f"{m.group(2)}.{m.group(3)}" in SpecifierSet(requires), f"image Python {m.group(2)}.{m.group(3)} vs requires-python {requires}"
    workdir = image_workdir()
    assert posixpath.isabs(workdir), "cluster/Dockerfile: WORKDIR must be absolute"

    copied: list[str] = []
    runs: list[tuple[int, str]] = []
    for i, (word, a) in enumerate(instr):
        if word == "COPY":
            parts = [p for p in a.split() if not p.startswith("--")]
            for src in parts[:-1]:
                assert (REPO / src).exists(), f"cluster/Dockerfile: COPY source {src} does not exist (build context is the repo root)"
                copied.append((i, src))
        elif word == "RUN":
            runs.append((i, a))
    srcs = {s for _, s in copied}
    for need in ("constraints.txt", "pyproject.toml", "rlora", "jobs", "examples"):
        assert need in srcs, f"cluster/Dockerfile: the image needs {need} (COPY it)"

    torch_pin = re.search(r"^torch==(\S+)", (REPO / "constraints.txt").read_text(encoding="utf-8"), re.M)
    assert torch_pin, "constraints.txt pins no torch version"
    torch_runs = [i for i, a in runs if re.search(r"pip install\b.*\btorch==" + re.escape(torch_pin.group(1)) + r"\b", a)]
    project_runs = [i for i, a in runs if re.search(r"pip install\b.*-c constraints\.txt\b.*\s\.(\s|$)", a)]
    assert torch_runs, f"cluster/Dockerfile: pip install torch=={torch_pin.group(1)} (the constraints.txt pin) first"
    assert project_runs, "cluster/Dockerfile: install the project with pip install -c constraints.txt ."
    assert torch_runs[0] < project_runs[0], "cluster/Dockerfile: install torch before the project"
    before = {s for i, s in copied if i < project_runs[0]}
    readme = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"].get("readme", "README.md")
    for need in ("constraints.txt", "pyproject.toml", "rlora", readme):
        assert need in before, f"cluster/Dockerfile: COPY {need} before installing the project"

    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert ".venv" in ignore and ".git" in ignore, "cluster/Dockerfile.dockerignore should keep .venv and .git out of the context"
