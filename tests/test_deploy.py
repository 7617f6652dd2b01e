"""Deployment files, checked offline:

* ``cluster.yaml`` with Ray's own autoscaler validation (``prepare_config`` + ``validate_config``:
  the JSON schema Ray ships, no AWS credentials needed);
* ``deploy/rayjob.yaml`` / ``deploy/rayservice.yaml`` against the fields of KubeRay's v1 API
  (``ray.io/v1`` RayJob/RayService/RayCluster Go types: required fields, known field names at
  every KubeRay-defined level so a typo fails, ``rayStartParams`` values as strings, GPU limits);
  the embedded ``runtimeEnvYAML`` with Ray's ``RuntimeEnv``, ``serveConfigV2`` with Ray Serve's
  ``ServeDeploySchema`` and its ``args`` with raydetect's ``ServeConfig``, the entrypoint with
  raydetect's own CLI parser;
* ``jobs/runtime_env.yaml`` with Ray's ``RuntimeEnv``;
* ``deploy/grafana-dashboard.json``: every metric it charts is one raydetect.job.metrics defines.
"""

from __future__ import annotations

import copy
import json
import re
import shlex

import pytest
import yaml

from tests.conftest import REPO

# KubeRay v1 field names (ray-operator/apis/ray/v1/*_types.go)
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}
RAYSERVICE_SPEC = {
    "serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy", "excludeHeadPodFromServeSvc",
    "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold", "rayClusterDeletionDelaySeconds",
}
RAYCLUSTER_SPEC = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions", "managedBy",
}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
    "scaleStrategy", "suspend", "idleTimeoutSeconds",
}
AUTOSCALER_OPTIONS = {
    "resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
    "idleTimeoutSeconds", "upscalingMode", "version",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def load(path):
    return yaml.safe_load((REPO / path).read_text())


# --- cluster.yaml -------------------------------------------------------------------------------


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("cluster.yaml")
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] == "head"
    assert types["head"]["resources"].get("GPU", 0) == 0
    gpu_types = {t["node_config"]["InstanceType"].split(".")[0] for n, t in types.items() if n != "head"}
    assert gpu_types == {"g5", "g6", "p5"}
    for name, t in types.items():
        if name != "head":
            assert t["resources"]["GPU"] >= 1 and 0 == t["min_workers"] < t["max_workers"]
    assert 0 < cfg["idle_timeout_minutes"] <= 60
    assert any("pip install" in c and "raydetect" in c for c in cfg["setup_commands"])
    assert any("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"])
    from raydetect.serve.ingress import INGRESS_ENV

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cfg[key] if "ray start" in c)
        for name, value in INGRESS_ENV["haproxy"].items():
            assert f"{name}={value}" in start, (key, name)


def test_ray_validation_rejects_a_broken_cluster_yaml():
    """The check above can fail: Ray's schema catches a misspelt key and a bad type."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("cluster.yaml")
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_g5"]["max_workerz"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_workerz"):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["idle_timeout_minutes"] = "soon"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


# --- KubeRay ------------------------------------------------------------------------------------


def check_keys(obj: dict, allowed: set[str], where: str, required: tuple[str, ...] = ()) -> None:
    assert isinstance(obj, dict), f"{where}: expected a mapping"
    unknown = set(obj) - allowed
    assert not unknown, f"{where}: fields not in the KubeRay v1 API: {sorted(unknown)}"
    missing = [k for k in required if k not in obj]
    assert not missing, f"{where}: required fields missing: {missing}"


def check_pod_template(tpl: dict, where: str, gpus: bool) -> None:
    containers = tpl["spec"]["containers"]
    assert containers, f"{where}: no containers"
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: a container needs name and image"
    limits = containers[0].get("resources", {}).get("limits", {})
    assert ("nvidia.com/gpu" in limits) == gpus, f"{where}: GPU limit {'missing' if gpus else 'unexpected'}"


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    check_keys(spec, RAYCLUSTER_SPEC, where, ("headGroupSpec",))
    if "autoscalerOptions" in spec:
        check_keys(spec["autoscalerOptions"], AUTOSCALER_OPTIONS, f"{where}.autoscalerOptions")
        assert spec["autoscalerOptions"].get("upscalingMode", "Default") in {"Default", "Aggressive", "Conservative"}
    head = spec["headGroupSpec"]
    check_keys(head, HEAD_GROUP, f"{where}.headGroupSpec", ("rayStartParams", "template"))
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    check_pod_template(head["template"], f"{where}.headGroupSpec", gpus=False)
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        w = f"{where}.workerGroupSpecs[{g.get('groupName')}]"
        check_keys(g, WORKER_GROUP, w, ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"))
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        check_pod_template(g["template"], w, gpus=True)
    if spec.get("enableInTreeAutoscaling"):
        assert any(g["maxReplicas"] > g["minReplicas"] for g in groups), "autoscaling needs room to scale"


def test_kuberay_rayjob():
    from ray.runtime_env import RuntimeEnv

    from raydetect.cli import build_parser
    from raydetect.cli.detect import job_config

    doc = load("deploy/rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    check_keys(spec, RAYJOB_SPEC, "RayJob.spec", ("entrypoint", "rayClusterSpec"))
    assert spec["submissionMode"] in SUBMISSION_MODES
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
    check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob.spec.rayClusterSpec")
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["raydetect", "detect"]
    args = build_parser().parse_args(argv[1:])  # the entrypoint parses with raydetect's CLI
    job = job_config(args)
    assert job.num_gpus == 1 and job.concurrency > job.min_actors


def test_kuberay_rayservice():
    from ray.serve.schema import ServeDeploySchema

    doc = load("deploy/rayservice.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    spec = doc["spec"]
    check_keys(spec, RAYSERVICE_SPEC, "RayService.spec", ("serveConfigV2", "rayClusterConfig"))
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    (app,) = serve_cfg.applications
    assert app.import_path == "raydetect.serve:app_builder"
    check_ray_cluster_spec(spec["rayClusterConfig"], "RayService.spec.rayClusterConfig")
    try:
        from raydetect.serve.app import serve_config_from_args
    except ImportError as e:  # the Serve app is another module's; its absence is reported, not hidden
        pytest.fail(f"raydetect.serve.app is not importable: {e}")
    cfg = serve_config_from_args(app.args)
    assert cfg.num_gpus == 0.25 and cfg.max_replicas > cfg.min_replicas
    # every Ray container starts Ray with Serve's HAProxy ingress, as raydetect serve does
    from raydetect.serve.ingress import INGRESS_ENV

    cluster = spec["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for tpl in templates:
        env = {e["name"]: e["value"] for e in tpl["spec"]["containers"][0].get("env", [])}
        assert INGRESS_ENV["haproxy"].items() <= env.items(), env


def test_kuberay_check_catches_mistakes():
    doc = load("deploy/rayjob.yaml")
    bad = copy.deepcopy(doc["spec"]["rayClusterSpec"])
    bad["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(AssertionError, match="maxReplica"):
        check_ray_cluster_spec(bad, "x")
    bad = copy.deepcopy(doc["spec"]["rayClusterSpec"])
    bad["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    with pytest.raises(AssertionError, match="strings"):
        check_ray_cluster_spec(bad, "x")


# --- runtime env and dashboard ------------------------------------------------------------------


def test_runtime_env_example_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**load("jobs/runtime_env.yaml"))
    assert env["working_dir"] == "." and "/.?*" in env["excludes"]  # .git, .venv and the like
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(REPO, env["excludes"])
    assert not excluded(REPO) and not excluded(REPO / "jobs" / "detect.py")
    assert not excluded(REPO / "raydetect" / "detector.py")
    assert excluded(REPO / ".git") and excluded(REPO / ".venv" / "lib") and excluded(REPO / "benchmarks" / "results")


def test_grafana_dashboard_charts_raydetect_metrics():
    import raydetect.job.metrics as m

    dash = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    assert dash["title"] and dash["uid"] and dash["panels"]
    defined = set()
    for module in ("job/metrics.py", "serve/metrics.py"):  # the job's and the Serve replicas' metrics
        defined |= set(re.findall(r'"(raydetect_[a-z_]+)"', (REPO / "raydetect" / module).read_text()))
    assert {"raydetect_job_images", "raydetect_job_batch_latency_s", "raydetect_job_gpu_memory_bytes"} <= defined
    used = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            used |= set(re.findall(r"ray_(raydetect_[a-z_]+?)(?:_total|_bucket|_sum|_count)?\b", t["expr"]))
    assert used <= defined and {"raydetect_job_images", "raydetect_job_errors", "raydetect_job_batch_latency_s"} <= used
    assert {"raydetect_queue_depth", "raydetect_queue_wait_ms", "raydetect_queue_images"} <= used
    assert m.LATENCY_BOUNDARIES == sorted(m.LATENCY_BOUNDARIES)
