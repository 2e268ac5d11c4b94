"""Checkpoints move between layouts, and a crash during a save never damages the last good one.

Round trip: af_pipe (2 attention, 2 expert ranks, p = 1) trains 3 steps and saves; a single
process loads it and saves again; af_pipe (1, 1, 1) loads that and saves; colocated EP 2
loads the last one. After every load, each parameter, each optimizer state (Adam moments
and step) and the LR schedule equal the first run's, exactly.
"""

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchtitan_disagmoe.config.job_config import JobConfig
from torchtitan_disagmoe.config.manager import with_overrides

from .harness import run_single_fn, spawn

pytestmark = pytest.mark.slow
GLOBAL_BATCH = 4


def _config(folder: Path, layout: str, steps: int = 3) -> JobConfig:
    af = {"af_pipe_A2F2": (2, 2), "af_pipe_A1F1": (1, 1)}.get(layout)
    dp = {"single": 1, "af_pipe_A2F2": 2, "af_pipe_A1F1": 1, "ep2": 2}[layout]
    return with_overrides(
        JobConfig(),
        job={"dump_folder": str(folder)},
        training={"steps": steps, "local_batch_size": GLOBAL_BATCH // dp, "seq_len": 32},
        parallelism={"expert_parallel_degree": 2 if layout == "ep2" else 1},
        disagmoe={"mode": "af_pipe", "attention_ranks": af[0], "expert_ranks": af[1]} if af
        else {"mode": "colocated"},
        checkpoint={"enable": True, "interval": 3},
        metrics={"enable_tensorboard": False},
    )


def _full(value):
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().clone().cpu() if isinstance(value, torch.Tensor) else value


def _gather_state(trainer) -> dict:
    """Model, optimizer and LR-schedule state by FQN, whole, merged over ranks (collective)."""
    state = {f"model.{k}": _full(v) for k, v in sorted(trainer.model.state_dict().items())}
    state.update({f"optim.{k}": _full(v) for k, v in sorted(trainer.optimizers.state_dict().items())})
    sched = trainer.lr_schedulers.schedulers[0].state_dict()
    state.update({"lr.last_epoch": sched["last_epoch"], "lr._last_lr": sched["_last_lr"], "step": trainer.step})
    if trainer.world_size == 1:
        return state
    everyone = [None] * trainer.world_size
    dist.all_gather_object(everyone, state)
    merged = {}
    for part in everyone:
        merged.update(part)
    return merged


def _load_compare_save(config: JobConfig, cache: str, train_first: bool) -> dict:
    """Train (first layout only) or just load the newest checkpoint; return the gathered
    state; then write this layout's own checkpoint of the same step into ``<dump>/resaved``."""
    from torchtitan_disagmoe.trainer import Trainer

    trainer = Trainer(config, cache_dir=cache)
    try:
        if train_first:
            trainer.train()
        state = _gather_state(trainer)
        resaved = Path(config.job.dump_folder) / "resaved"
        trainer.checkpointer.folder = str(resaved)
        trainer.checkpointer.save(trainer.step, last_step=True)
    finally:
        trainer.close()
    return state


def _run(layout: str, config: JobConfig, cache: str, train_first: bool = False) -> dict:
    world = {"single": 1, "af_pipe_A2F2": 4, "af_pipe_A1F1": 2, "ep2": 2}[layout]
    if world == 1:
        return run_single_fn(_load_compare_save, config, cache, train_first)
    return spawn(world, _load_compare_save, config, cache, train_first)


def _assert_same_state(got: dict, want: dict, layout: str) -> None:
    assert got.keys() == want.keys(), f"{layout}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=f"{layout}: {key}")
        else:
            assert got[key] == value, f"{layout}: {key}: {got[key]} != {value}"


def test_checkpoint_round_trip_through_four_layouts(tmp_path):
    cache = str(tmp_path / "cache")
    chain = ["af_pipe_A2F2", "single", "af_pipe_A1F1", "ep2"]
    reference = _run(chain[0], _config(tmp_path / chain[0], chain[0]), cache, train_first=True)
    assert reference["step"] == 3
    assert any(k.startswith("optim.state.layers.1.moe.experts.w1.exp_avg") for k in reference)
    previous = chain[0]
    for layout in chain[1:]:
        source = tmp_path / previous / "resaved" / "step-3"
        shutil.copytree(source, tmp_path / layout / "checkpoint" / "step-3")
        state = _run(layout, _config(tmp_path / layout, layout), cache)
        _assert_same_state(state, reference, layout)
        previous = layout


def _crashing_finish(self, *args, **kwargs):
    raise OSError("disk full (injected while writing the checkpoint's metadata)")


def _train_until(config: JobConfig, cache: str, crash_on_save_at: int | None) -> dict:
    """Train; optionally crash inside the DCP save of step ``crash_on_save_at``, after the
    data files are written and before the metadata (the worst moment)."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from torchtitan_disagmoe.distributed.failure import TrainingFailure
    from torchtitan_disagmoe.trainer import Trainer

    trainer = Trainer(config, cache_dir=cache)
    original = FileSystemWriter.finish
    error = None
    try:
        if crash_on_save_at is not None:
            logged = trainer.train(stop_at=crash_on_save_at - 1)
            FileSystemWriter.finish = _crashing_finish
            try:
                logged += trainer.train(stop_at=crash_on_save_at)
            except TrainingFailure as e:
                error = str(e)
        else:
            logged = trainer.train()
    finally:
        FileSystemWriter.finish = original
        trainer.close()
    return {"logged": logged, "error": error, "resumed_from": logged[0]["step"] - 1 if logged else None}


@pytest.mark.parametrize("world_size", [1, 2], ids=["single", "af_pipe-A1F1"])
def test_crash_during_save_keeps_the_last_good_checkpoint(tmp_path, world_size):
    from torchtitan_disagmoe.components.preflight import latest_checkpoint

    cache = str(tmp_path / "cache")
    layout = "single" if world_size == 1 else "af_pipe_A1F1"

    def run(folder, crash_at=None):
        config = _config(tmp_path / folder, layout, steps=6)
        config.checkpoint.interval = 2
        if world_size == 1:
            return run_single_fn(_train_until, config, cache, crash_at)
        return spawn(world_size, _train_until, config, cache, crash_at)

    straight = run("straight")["logged"]
    crashed = run("crashed", crash_at=4)
    assert crashed["error"] and "disk full" in crashed["error"] and "saving a checkpoint" in crashed["error"]
    folder = tmp_path / "crashed" / "checkpoint"
    assert (folder / "step-4").is_dir() and not (folder / "step-4" / ".metadata").exists()
    assert latest_checkpoint(_config(tmp_path / "crashed", layout)).name == "step-2"
    resumed = run("crashed")["logged"]
    assert [m["step"] for m in resumed] == [3, 4, 5, 6]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight[2:]]
    assert (folder / "step-4" / ".metadata").is_file()  # re-saved, complete this time
