"""DCP checkpoints through torchtitan 0.2.2's CheckpointManager.

We reuse its manager (DCP save/load of model, optimizer, LR schedule, data loader and
train state; interval saves; keep-latest-k purge) and translate our ``[checkpoint]``
section into its config. What we fix: the last save keeps optimizer and data state
(torchtitan defaults to model-only there, which cannot be resumed), and a trainer with
checkpointing disabled gets a no-op object, so the training loop has no branches.
"""

import logging
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.config.job_config import Checkpoint as TTCheckpoint

from torchtitan_disagmoe.components.hf_import import load_initial_weights, prepare_initial_load

logger = logging.getLogger("torchtitan_disagmoe")


class TrainState(Stateful):
    """The step counter, saved with every checkpoint."""

    def __init__(self, trainer):
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.trainer.step, dtype=torch.int64)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.trainer.step = int(state_dict["step"])


class _NoData(Stateful):
    """Stands in for the data loader on ranks that read no data (af_pipe expert ranks), so
    that every rank saves the same kinds of state."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class _NoCheckpoint:
    def save(self, curr_step: int, last_step: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


def build_checkpointer(config, trainer):
    """Create the manager and resume from the newest checkpoint in the folder, if any;
    with none there, load ``checkpoint.initial_load_path`` (HF or DCP) if set. With
    checkpointing disabled an initial load still happens, model only (hf_import.py)."""
    c = config.checkpoint
    sd_adapter = prepare_initial_load(config, trainer.model, trainer.model_args)
    if not c.enable:
        if c.initial_load_path:
            load_initial_weights(trainer.model, c.initial_load_path, sd_adapter)
            logger.info(f"loaded the model weights from {c.initial_load_path}")
        return _NoCheckpoint()
    tt_config = TTCheckpoint(enable=True, folder=c.folder, interval=c.interval,
                             keep_latest_k=c.keep_latest_k, last_save_model_only=False,
                             async_mode="disabled", initial_load_path=c.initial_load_path or None,
                             initial_load_in_hf=c.initial_load_in_hf,
                             initial_load_model_only=c.initial_load_model_only)
    manager = CheckpointManager(
        dataloader=trainer.dataloader if trainer.dataloader is not None else _NoData(), model_parts=[trainer.model], optimizers=trainer.optimizers,
        lr_schedulers=trainer.lr_schedulers, states={"train_state": TrainState(trainer)},
        checkpoint_config=tt_config, sd_adapter=sd_adapter, base_folder=config.job.dump_folder)
    if manager.load(step=-1):
        logger.info(f"resumed from checkpoint at step {trainer.step}" if trainer.step else
                    f"loaded the initial weights from {c.initial_load_path}")
    return manager
