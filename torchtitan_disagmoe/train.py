"""Training entry point.

Run (CPU, 2 processes)::

    NGPU=2 ./run_train.sh                                  # train_configs/debug_model.toml
    torchrun --nproc-per-node 2 -m torchtitan_disagmoe.train \
        --job.config_file train_configs/debug_model.toml --training.steps 10

Any ``--section.key value`` overrides the TOML file.
"""

import sys

import torch.distributed as dist

from torchtitan_disagmoe.config.manager import ConfigError, load_job_config
from torchtitan_disagmoe.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_job_config(sys.argv[1:] if argv is None else argv)
        trainer = Trainer(config)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # Config checks that need the model or the world size raise plain ValueError.
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
