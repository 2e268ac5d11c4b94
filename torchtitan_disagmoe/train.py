"""Training entry point.

Run (CPU, 2 processes)::

    NGPU=2 ./run_train.sh                                  # train_configs/debug_model.toml
    torchrun --nproc-per-node 2 -m torchtitan_disagmoe.train \
        --job.config_file train_configs/debug_model.toml --training.steps 10

Any ``--section.key value`` overrides the TOML file.
"""

import logging
import os
import sys

import torch.distributed as dist

from torchtitan_disagmoe.config.manager import ConfigError, load_job_config
from torchtitan_disagmoe.distributed.failure import TrainingFailure
from torchtitan_disagmoe.trainer import Trainer

EXIT_CONFIG, EXIT_FAILED = 2, 1


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_job_config(sys.argv[1:] if argv is None else argv)
        trainer = Trainer(config)
    except (ConfigError, ValueError) as e:
        # Checks that need the model, the world size or the disk raise plain ValueError.
        print(f"configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        trainer.train()
    except TrainingFailure as e:
        trainer.close()  # flush metrics; checkpoints already saved are complete
        _record_for_torchrun(e)
        print(f"training failed: {e}", file=sys.stderr, flush=True)
        logging.shutdown()
        # Not a normal exit: tearing down process groups whose peers are gone can hang.
        os._exit(EXIT_FAILED)
    trainer.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _record_for_torchrun(error: BaseException) -> None:
    """Write the error file torchrun's failure summary reads (TORCHELASTIC_ERROR_FILE)."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(error)


if __name__ == "__main__":
    sys.exit(main())
