"""Run a Kubernetes Indexed Job of torchrun pods on this host, with the environment each pod would get.

Reads the manifest (``launch/k8s/train.yaml``), and for every completion index builds what the
container would see: its ``env`` (values, and the completion index where a ``fieldRef`` asks for
the Job's annotation), ``JOB_COMPLETION_INDEX`` and ``HOSTNAME`` as the Job controller sets them,
and its command with ``$(VAR)`` expanded as the kubelet does. The headless Service's DNS name
(``train-0.train``) becomes 127.0.0.1. The pods' torchrun flags (nodes, ranks per node, node rank
= completion index, master address and port) are then checked and handed to
``labutils.launch.simulate_nodes`` (static rendezvous: ``--node-rank i --master-addr 127.0.0.1``),
so the same script starts with the same arguments. ``nproc`` may lower the ranks per pod (4 GPUs in
the manifest; 2 gloo CPU ranks here), and the port is a free one rather than 29500.

  python launch/k8s/local_pods.py launch/k8s/train.yaml        # show each pod's environment and command

Used in lab3 §Orchestrators.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@dataclass
class Pod:
    index: int
    hostname: str
    env: dict[str, str]  # what the container's process sees (the manifest's env + the controller's)
    command: list[str]  # command + args, $(VAR) expanded


def _docs(manifest) -> list[dict]:
    return [d for d in yaml.safe_load_all(Path(manifest).read_text()) if d]


def _expand(s: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined variables are replaced, $$ escapes, others stay."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)


def pods(manifest, local_host: str = "127.0.0.1") -> list[Pod]:
    """Each pod of the manifest's Indexed Job, its Service's DNS names replaced by ``local_host``."""
    docs = _docs(manifest)
    jobs = [d for d in docs if d["kind"] == "Job"]
    if len(jobs) != 1 or jobs[0]["spec"].get("completionMode") != "Indexed":
        raise ValueError(f"{manifest}: expected one Job with completionMode: Indexed")
    job = jobs[0]
    name, spec = job["metadata"]["name"], job["spec"]
    tmpl = spec["template"]["spec"]
    sub = tmpl.get("subdomain")
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    if sub not in services:
        raise ValueError(f"{manifest}: the pods' subdomain {sub!r} must name a headless Service of the manifest "
                         f"(have {sorted(services)}), else {name}-0.{sub} does not resolve")
    (container,) = tmpl["containers"]
    out = []
    for i in range(int(spec["completions"])):
        env = {"JOB_COMPLETION_INDEX": str(i), "HOSTNAME": f"{name}-{i}"}
        for e in container.get("env", []):
            ref = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            if ref is not None and ref != INDEX_ANNOTATION:
                raise ValueError(f"{manifest}: env {e['name']} reads {ref}, which this local run cannot provide")
            env[e["name"]] = str(i) if ref else _expand(str(e.get("value", "")), env)
        cmd = [_expand(str(c), env) for c in container.get("command", []) + container.get("args", [])]
        cmd = [re.sub(rf"\b{re.escape(name)}-(\d+)\.{re.escape(sub)}(\.[\w.-]+)?\b", local_host, c) for c in cmd]
        out.append(Pod(i, f"{name}-{i}", env, cmd))
    return out


def torchrun_plan(ps: list[Pod]) -> dict:
    """The pods' torchrun flags, checked: same everywhere but ``--node-rank``, which is the pod's index."""
    plans = []
    for p in ps:
        cmd = p.command
        if cmd[1:3] != ["-m", "torch.distributed.run"] or "-m" not in cmd[3:]:
            raise ValueError(f"pod {p.index}: expected `python -m torch.distributed.run ... -m MODULE`, got {cmd}")
        k = cmd.index("-m", 3)
        flags = dict(f.lstrip("-").split("=", 1) for f in cmd[3:k])
        if int(flags.get("node-rank", -1)) != p.index:
            raise ValueError(f"pod {p.index}: --node-rank is {flags.get('node-rank')}, not its completion index")
        plans.append({"flags": flags, "target": cmd[k + 1], "args": cmd[k + 2:]})
    same = [{**pl, "flags": {f: v for f, v in pl["flags"].items() if f != "node-rank"}} for pl in plans]
    if any(s != same[0] for s in same):
        raise ValueError("the pods do not run the same command (apart from --node-rank)")
    f = same[0]["flags"]
    if int(f["nnodes"]) != len(ps):
        raise ValueError(f"--nnodes={f['nnodes']} but the Job has {len(ps)} pods (completions)")
    return {"nnodes": len(ps), "nproc_per_node": int(f["nproc-per-node"]), "master": f["master-addr"],
            "target": same[0]["target"], "args": same[0]["args"]}


def run_locally(manifest, *, nproc: int | None = None, extra_args=(), env: dict | None = None, **launch_kw):
    """Start the manifest's pods as ``simulate_nodes`` agents here: (LaunchResult, pods, plan)."""
    from labutils import launch

    ps = pods(manifest)
    plan = torchrun_plan(ps)
    common = {k: v for k, v in ps[0].env.items() if all(p.env.get(k) == v for p in ps)}
    r = launch.simulate_nodes(plan["nnodes"], nproc or plan["nproc_per_node"], plan["target"],
                              [*plan["args"], *map(str, extra_args)], rendezvous="static",
                              env=common | dict(env or {}), **launch_kw)
    return r, ps, plan


if __name__ == "__main__":
    for pod in pods(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("train.yaml")):
        print(f"pod {pod.hostname}: env {pod.env}\n  {' '.join(pod.command)}")
