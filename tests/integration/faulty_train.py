"""The training entry point with one injected fault, for tests/integration/test_fail_fast.py.

Usage: torchrun ... faulty_train.py RANK STEP <training args>: on rank RANK, the expert
computation (af_pipe) raises at step STEP. Production code is unchanged; the fault is
patched in here.
"""

import os
import sys

from torchtitan_disagmoe import train
from torchtitan_disagmoe.distributed import af_engine


def main() -> int:
    fault_rank, fault_step = int(sys.argv[1]), int(sys.argv[2])
    if int(os.environ.get("RANK", 0)) == fault_rank:
        original = af_engine.AFPipeRuntime._expert_forward

        def faulty(self, layer, mb):
            if self.activity.step == fault_step:
                raise RuntimeError(f"injected fault on rank {fault_rank}")
            return original(self, layer, mb)

        af_engine.AFPipeRuntime._expert_forward = faulty
    return train.main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
