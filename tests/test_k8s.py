"""The Kubernetes manifests: valid against the API schema (offline), and runnable here as the pods would run.

kubernetes-validate checks built-in kinds (Service, Job) against Kubernetes 1.37's schema, strictly
(unknown fields fail); the Kubeflow PyTorchJob is a custom resource, so it is checked for starting
the same script with the same arguments instead. The pods' job itself runs in lab3 §Orchestrators (under
nbval in make test) with the environment each pod would get, and must repeat torchrun's losses on two nodes
(fault.require_same_run); it is not run a second time here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("local_pods", REPO / "launch/k8s/local_pods.py")
local_pods = sys.modules.setdefault("local_pods", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(local_pods)

K8S_VERSION = "1.37"
MANIFESTS = ["launch/k8s/train.yaml", "launch/k8s/dist_check.yaml"]


@pytest.mark.parametrize("path", MANIFESTS)
def test_manifest_passes_the_schema(path):
    kv = pytest.importorskip("kubernetes_validate", reason="NOT RUN: pip install kubernetes-validate")
    docs = [d for d in yaml.safe_load_all((REPO / path).read_text()) if d]
    assert sorted(d["kind"] for d in docs) == ["Job", "Service"]
    for d in docs:
        kv.validate(d, K8S_VERSION, strict=True)  # raises ValidationError on any unknown or mistyped field


def test_the_schema_check_catches_a_typo():
    kv = pytest.importorskip("kubernetes_validate", reason="NOT RUN: pip install kubernetes-validate")
    job = [d for d in yaml.safe_load_all((REPO / MANIFESTS[0]).read_text()) if d and d["kind"] == "Job"][0]
    job["spec"]["template"]["spec"]["containers"][0]["envv"] = []
    with pytest.raises(kv.ValidationError, match="envv"):
        kv.validate(job, K8S_VERSION, strict=True)


def test_each_pod_gets_its_index_as_node_rank():
    ps = local_pods.pods(REPO / "launch/k8s/train.yaml")
    assert [p.hostname for p in ps] == ["train-0", "train-1"]
    for p in ps:
        assert p.env["JOB_COMPLETION_INDEX"] == p.env["NODE_RANK"] == str(p.index)
        assert f"--node-rank={p.index}" in p.command and "--master-addr=127.0.0.1" in p.command
        assert p.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" and p.env["NCCL_NVLS_ENABLE"] == "0"
    plan = local_pods.torchrun_plan(ps)
    assert (plan["nnodes"], plan["nproc_per_node"], plan["target"]) == (2, 4, "labutils.scripts.train")


def test_a_node_count_that_does_not_match_the_pods_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "launch/k8s/train.yaml").read_text().replace("--nnodes=2", "--nnodes=3"))
    with pytest.raises(ValueError, match="--nnodes=3 but the Job has 2 pods"):
        local_pods.torchrun_plan(local_pods.pods(bad))
    bad.write_text((REPO / "launch/k8s/train.yaml").read_text().replace("subdomain: train", "subdomain: trian"))
    with pytest.raises(ValueError, match="subdomain 'trian' must name a headless Service"):
        local_pods.pods(bad)


def test_the_pytorchjob_starts_the_same_script():
    (pj,) = [d for d in yaml.safe_load_all((REPO / "launch/k8s/train-pytorchjob.yaml").read_text()) if d]
    c = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    plan = local_pods.torchrun_plan(local_pods.pods(REPO / "launch/k8s/train.yaml"))
    assert c["command"] == ["python", "-m", "torch.distributed.run"]
    assert c["args"] == ["-m", plan["target"], *plan["args"]]
    assert pj["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == plan["nnodes"]
