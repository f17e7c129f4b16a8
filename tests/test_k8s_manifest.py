"""k8s/rayjob.yaml and ray_cluster.yaml agree with the project (no cluster needed).

The Ray version, the GPUs the production preset needs, the entrypoint and its config files,
the pip pins, the RayJob's lifecycle fields, no credentials, no dashboard on 0.0.0.0.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement

from conftest import REPO
from pipeline.infra.config import Config, load_config
from pipeline.infra.secrets import SECRET_VALUE, find_credentials, is_credential_key

RAYJOB = REPO / "k8s" / "rayjob.yaml"
RAY_CLUSTER = REPO / "ray_cluster.yaml"
PYPROJECT = REPO / "pyproject.toml"
DASHBOARD_ON_ALL_INTERFACES = re.compile(r"--dashboard-host[= ]+['\"]?(0\.0\.0\.0|::)(?![\w.:])")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


@pytest.fixture(scope="module")
def ray_version(pyproject) -> str:
    """The exact version of the ``ray[...]==X`` pin in pyproject.toml's dependencies."""
    pins = [Requirement(d) for d in pyproject["project"]["dependencies"]]
    ray = [r for r in pins if r.name == "ray"]
    assert len(ray) == 1, "pyproject.toml pins ray once"
    (spec,) = ray[0].specifier
    assert spec.operator == "==", f"ray must be pinned exactly, not {spec}"
    return spec.version


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


@pytest.fixture(scope="module")
def cluster(rayjob) -> dict:
    return rayjob["spec"]["rayClusterSpec"]


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(RAY_CLUSTER.read_text())


def containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def gpu_groups(cluster: dict) -> list[dict]:
    return [g for g in cluster.get("workerGroupSpecs", [])
            if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                   for c in g["template"]["spec"]["containers"])]


def parse_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(--config files, key=value overrides), as jobs.annotate's command line takes them (not
    imported: the manifest test stays independent of the job's imports)."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("overrides", nargs="*")
    parsed = parser.parse_args(args)
    return parsed.config, parsed.overrides


def entrypoint_args(rayjob: dict) -> tuple[str, list[str]]:
    """(module run with ``python -m``, the arguments after it)."""
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[0] in ("python", "python3") and argv[1] == "-m", f"not a `python -m` entrypoint: {argv[:3]}"
    return argv[2], argv[3:]


def entrypoint_config(rayjob: dict) -> Config:
    """The config the entrypoint's job runs with (its --config files and overrides, from the
    repository root, which is the working_dir)."""
    _, args = entrypoint_args(rayjob)
    files, overrides = parse_args(args)
    return load_config([str(REPO / f) for f in files], overrides)


def gpus_needed(cfg: Config) -> int:
    """GPUs the job's services reserve at most: engine replicas x tensor_parallel_size x
    ceil(num_gpus) + retrieval replicas x ceil(num_gpus) (max_replicas when autoscaling)."""
    def most(svc) -> int:
        return svc.max_replicas if svc.max_replicas is not None else svc.replicas

    engine = most(cfg.engine.service) * cfg.engine.tensor_parallel_size * math.ceil(cfg.engine.service.num_gpus)
    retrieval = most(cfg.retrieval.service) * math.ceil(cfg.retrieval.service.num_gpus)
    return engine + retrieval


def pins(requirements) -> dict[str, str]:
    """{name: 'name[extras]specifier'} of requirement strings, normalised by packaging."""
    return {r.name: str(r) for r in map(Requirement, requirements)}


def test_kind_and_api_version(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]


def test_ray_version_and_images_match_the_pin(cluster, ray_version):
    assert str(cluster["rayVersion"]) == ray_version
    images = [c["image"] for c in containers(cluster)]
    assert len(images) >= 2, "a head and at least one worker container"
    for image in images:
        repo, _, tag = image.rpartition(":")
        assert repo == "rayproject/ray" and tag.split("-")[0] == ray_version, image


def test_gpu_workers_cover_the_production_preset(rayjob, cluster):
    preset = load_config([str(REPO / "conf" / "production.yaml")], [])
    needed = gpus_needed(preset)
    assert gpus_needed(entrypoint_config(rayjob)) == needed, "the entrypoint's overrides change the GPUs"
    (group,) = gpu_groups(cluster)
    (container,) = group["template"]["spec"]["containers"]
    res = container["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"], "GPU requests == limits"
    per_pod = int(res["limits"]["nvidia.com/gpu"])
    assert per_pod >= 1
    assert per_pod * group["maxReplicas"] == needed, "maxReplicas x GPUs per pod = the preset's GPUs"
    assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0, "no GPU held before the job asks"
    assert cluster["enableInTreeAutoscaling"] is True


def test_head_has_no_gpu_and_no_public_dashboard(cluster):
    head = cluster["headGroupSpec"]
    assert str(head["rayStartParams"].get("num-gpus")) == "0"
    for container in head["template"]["spec"]["containers"]:
        for kind in ("requests", "limits"):
            assert "nvidia.com/gpu" not in container.get("resources", {}).get(kind, {}), kind
    assert head["rayStartParams"].get("dashboard-host") not in ("0.0.0.0", "::")
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)


def test_entrypoint_module_and_config_files_exist(rayjob):
    module, args = entrypoint_args(rayjob)
    path = REPO / module.replace(".", "/")
    assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), f"no module {module}"
    files, _ = parse_args(args)
    assert files, "the entrypoint names a --config preset"
    for f in files:
        assert (REPO / f).is_file(), f"--config {f} does not exist"
    entrypoint_config(rayjob)  # and the overrides make a valid config


def test_runtime_env_pins_match_pyproject(rayjob, pyproject):
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert str(runtime_env["working_dir"]).endswith(".zip")
    wanted = pins(pyproject["project"]["dependencies"] + pyproject["project"]["optional-dependencies"]["gpu"])
    wanted.pop("ray")  # in the image
    assert pins(runtime_env["pip"]) == wanted


def test_lifecycle_fields(rayjob):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    for field in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
        value = spec.get(field)
        assert isinstance(value, int) and not isinstance(value, bool) and value > 0, f"{field}: {value!r}"
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")


def env_credentials(tree, prefix: str = ""):
    """Kubernetes env entries ({name, value}) whose name says they hold a credential."""
    if isinstance(tree, dict):
        if isinstance(tree.get("name"), str) and tree.get("value") not in (None, "") and is_credential_key(tree["name"]):
            yield f"{prefix}{tree['name']}"
        for key, value in tree.items():
            yield from env_credentials(value, f"{prefix}{key}.")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from env_credentials(value, f"{prefix}[{i}].")


def test_no_credentials(rayjob):
    text = RAYJOB.read_text()
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    # A Kubernetes `key` field (tolerations, selectors, secretKeyRef) names a key, it holds none.
    found = [(path, why) for tree in (rayjob, runtime_env) for path, why in find_credentials(tree)
             if path.rsplit(".", 1)[-1] != "key"]
    found += [(path, "env var") for path in env_credentials(rayjob)]
    found += [(m.group(0)[:8] + "...", "raw text") for m in SECRET_VALUE.finditer(text)]
    found += [(m.group(0), "raw text") for m in re.finditer(r"(?i)aws_secret|aws_access_key_id|aws_session_token", text)]
    assert not found, found


def test_ray_cluster_yaml_dashboard_local_and_pinned(launcher, ray_version):
    for command in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]:
        assert not DASHBOARD_ON_ALL_INTERFACES.search(command), command
    repo, _, tag = launcher["docker"]["image"].rpartition(":")
    assert repo == "rayproject/ray" and tag.split("-")[0] == ray_version, launcher["docker"]["image"]
