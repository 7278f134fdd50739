"""lab2's training experiments in one torchrun job: ``lab2_pipeline`` (§4), then ``lab2_data`` (§5-§7).

The two scripts run one after the other on the same ranks and the same process group (``dist.held``):
one start-up of the ranks instead of two. On a 2-core CPU a start-up of 4 ranks is most of a job (each
rank imports torch, DTensor and transformers: ~10 s of CPU), so this saves ~20 s of the lab there. Each
script checks its own results first, as when it runs alone; if the pipeline's check fails, the data part
does not run and the job exits with the pipeline's status.

Run from the repository root (each script's JSON is written where its ``--*-out`` says):

  CPU, 4 gloo ranks:  python -m labutils.launch --nproc 4 labutils.scripts.lab2_training -- \\
                          --pipeline-out pp.json --data-out dp.json
  4 GPUs, nccl:       python -m torch.distributed.run --standalone --nproc-per-node 4 \\
                          -m labutils.scripts.lab2_training --pipeline-out pp.json --data-out dp.json
  Either part alone, with all its options: labutils.scripts.lab2_pipeline, labutils.scripts.lab2_data.

Used in lab2 §Pipeline parallelism to §Scaling laws.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from labutils import dist
from labutils.scripts import lab2_data, lab2_pipeline


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline-out", type=Path, default=None, help="lab2_pipeline's JSON")
    ap.add_argument("--data-out", type=Path, default=None, help="lab2_data's JSON")
    a = ap.parse_args(argv)
    with dist.held():
        status = lab2_pipeline.main([] if a.pipeline_out is None else ["--out", str(a.pipeline_out)])
        if status:
            dist.print0(f"lab2_pipeline exited {status}: lab2_data not run")
            return status
        return lab2_data.main([] if a.data_out is None else ["--out", str(a.data_out)])


if __name__ == "__main__":
    sys.exit(main())
