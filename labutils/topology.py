"""Which rank runs on which node, two "hosts" on one machine, and what NCCL says it connected.

- ``split_hosts_from_env()``: called by a script *before* ``dist.init``. When ``SMML_SPLIT_HOSTS=1``
  (the notebook sets it for ``launch.simulate_nodes``), it sets ``NCCL_HOSTID`` to
  ``<hostname>-node<GROUP_RANK>``. NCCL derives its host hash from ``NCCL_HOSTID`` when set (else
  from the hostname and boot id); ranks with different host hashes are different hosts to it, so
  it will not connect them by P2P (NVLink/PCIe) or SHM and takes its network transport (NET/IB or
  NET/Socket) between the two groups, while ranks of one fake node still use NVLink. No per-peer
  variable exists for this: ``NCCL_P2P_DISABLE``/``NCCL_SHM_DISABLE`` would turn the fast path off
  inside each node too. torchrun sets ``GROUP_RANK`` (the node rank) in every worker.
- ``nccl_debug_env(dir)``: NCCL_DEBUG=INFO for the INIT, GRAPH and NET subsystems, one file per
  process (``NCCL_DEBUG_FILE`` with ``%h``/``%p``), so each rank can read back its own log.
- ``parse_nccl_log(text)``: the "Channel ... via P2P/IPC" / "[send] via NET/Socket/0" lines, the
  communicators' node counts and the network chosen, as a small dict; ``merge`` adds ranks' up.
- ``layout(ctx)`` / ``node_groups(ranks)``: node of every rank; the intra-node, inter-node and
  world groups the lab compares (same size for intra and inter, so only the path differs).

Used in lab3 §Two nodes on one host, §Collectives.
"""

from __future__ import annotations

import os
import re
import socket
from collections import Counter
from pathlib import Path

SPLIT_ENV = "SMML_SPLIT_HOSTS"
DEBUG_SUBSYS = "INIT,GRAPH,NET"

# "host:pid:tid [dev] NCCL INFO Channel 00/0 : 3[3] -> 4[0] [send] via NET/Socket/0"  (NCCL >= 2.12)
# "host:pid:tid [dev] NCCL INFO Ring 00 : 1 -> 0 [receive] via NET/Socket/0"          (older NCCL)
_CHANNEL = re.compile(r"NCCL INFO (?:Channel|Ring) (\d+)(?:/\d+)? : (\d+)(?:\[\w+\])? -> (\d+)(?:\[\w+\])?"
                      r"(?: \[(send|receive)\])? via (\S+(?: pointer)?)")
_COMM = re.compile(r"NCCL INFO comm 0x[0-9a-f]+ rank (\d+) nRanks (\d+) nNodes (\d+) localRanks (\d+)")
_NETWORK = re.compile(r"NCCL INFO Using network (\w+)")
_HOSTID = re.compile(r"NCCL_HOSTID set by environment to (\S+)")
_VERSION = re.compile(r"NCCL version (\S+)")


def split_hosts_from_env(environ=os.environ) -> str | None:
    """Give this process's fake node its own NCCL host id (see the module docstring); returns it or None.

    An NCCL_HOSTID already set is kept (the caller chose it)."""
    if environ.get(SPLIT_ENV) != "1":
        return None
    if "NCCL_HOSTID" not in environ:
        environ["NCCL_HOSTID"] = f"{socket.gethostname()}-node{environ.get('GROUP_RANK', '0')}"
    return environ["NCCL_HOSTID"]


def nccl_debug_env(log_dir: str | os.PathLike) -> dict:
    """Environment that makes NCCL log its topology and transports to ``log_dir``/nccl.<host>.<pid>.log."""
    return {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": DEBUG_SUBSYS,
            "NCCL_DEBUG_FILE": str(Path(log_dir) / "nccl.%h.%p.log")}


def own_log(log_dir: str | os.PathLike) -> str:
    """This process's NCCL log text ('' when NCCL wrote none, e.g. under gloo)."""
    found = sorted(Path(log_dir).glob(f"nccl.*.{os.getpid()}.log"))  # NCCL's %h may cut the name at a dot
    return "".join(p.read_text(errors="replace") for p in found)


def transport_family(via: str) -> str:
    """'P2P/CUMEM/read' -> 'P2P/CUMEM', 'NET/Socket/0' -> 'NET/Socket', 'SHM/direct/direct' -> 'SHM'."""
    parts = via.split("/")
    if parts[0] in ("NET", "P2P", "CollNet"):
        return "/".join(parts[:2])
    return parts[0]


def parse_nccl_log(text: str) -> dict:
    """Summary of NCCL INFO lines: connections per transport, network, nodes per communicator."""
    conns = Counter()
    for m in _CHANNEL.finditer(text):
        *_, direction, via = m.groups()
        if direction != "receive":  # a network edge is logged by both ends ([send], [receive]): count one
            conns[transport_family(via)] += 1
    comms = sorted({tuple(map(int, m.groups())) for m in _COMM.finditer(text)})
    return {"connections": dict(conns),
            "inter_node": sum(v for k, v in conns.items() if k.startswith(("NET", "CollNet"))),
            "intra_node": sum(v for k, v in conns.items() if not k.startswith(("NET", "CollNet"))),
            "networks": sorted(set(_NETWORK.findall(text))),
            "hostids": sorted(set(_HOSTID.findall(text))),
            "versions": sorted(set(_VERSION.findall(text))),
            "comms": [{"rank": r, "nranks": n, "nnodes": nn, "local_ranks": lr} for r, n, nn, lr in comms]}


def merge(summaries: list[dict]) -> dict:
    """Several ranks' ``parse_nccl_log`` results added up (connections summed, the rest united)."""
    conns = Counter()
    for s in summaries:
        conns.update(s["connections"])
    union = {k: sorted({x for s in summaries for x in s[k]}) for k in ("networks", "hostids", "versions")}
    shapes = sorted({(c["nranks"], c["nnodes"]) for s in summaries for c in s["comms"]})
    return {"connections": dict(conns), "inter_node": sum(s["inter_node"] for s in summaries),
            "intra_node": sum(s["intra_node"] for s in summaries), **union,
            "comm_shapes": [{"nranks": n, "nnodes": nn} for n, nn in shapes]}


def describe(summary: dict) -> str:
    """One line for the notebook: 'NCCL 2.27.3, network Socket: 12 x NET/Socket (inter-node), ...'."""
    if not summary["connections"] and not summary["comm_shapes"]:
        return "no NCCL log (gloo ranks: gloo has one TCP transport, no NVLink/PCIe vs network distinction)"
    conns = ", ".join(f"{v} x {k} ({'inter-node' if k.startswith(('NET', 'CollNet')) else 'intra-node'})"
                      for k, v in sorted(summary["connections"].items()))
    shapes = "; ".join(f"{c['nranks']} ranks on {c['nnodes']} node(s)" for c in summary["comm_shapes"])
    return (f"NCCL {', '.join(summary['versions']) or '?'}, network {', '.join(summary['networks']) or '-'}; "
            f"connections: {conns or 'none'}; communicators: {shapes or '?'}")


def layout(ctx) -> list[dict]:
    """Where every rank runs: host, node (torchrun's GROUP_RANK), local rank, device, NCCL host id."""
    import torch.distributed as dist

    me = {"rank": ctx.rank, "host": socket.gethostname(), "node": int(os.environ.get("GROUP_RANK", 0)),
          "local_rank": ctx.local_rank, "device": str(ctx.device), "nccl_hostid": os.environ.get("NCCL_HOSTID")}
    everyone = [None] * ctx.world
    dist.all_gather_object(everyone, me)
    return everyone


def node_groups(ranks: list[dict]) -> dict[str, list[int]]:
    """{'intra': node 0's ranks, 'inter': the first half of node 0's and of node 1's, 'world': all}.

    intra and inter have the same size, so their difference is the path, not the rank count. One node
    (or one rank per node): only 'world'."""
    nodes = sorted({r["node"] for r in ranks})
    per = {n: sorted(r["rank"] for r in ranks if r["node"] == n) for n in nodes}
    groups = {"world": sorted(r["rank"] for r in ranks)}
    if len(nodes) >= 2 and len(per[nodes[0]]) >= 2 and len(per[nodes[0]]) == len(per[nodes[1]]):
        half = len(per[nodes[0]]) // 2
        groups = {"intra": per[nodes[0]], "inter": per[nodes[0]][:half] + per[nodes[1]][:half]} | groups
    return groups
