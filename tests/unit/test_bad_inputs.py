"""Every bad input is refused by the real entry point (``torchtitan_disagmoe.train.main``)
before any process group exists, with exit code 2 and a message naming the setting.

Each case sets the torchrun environment it needs (e.g. WORLD_SIZE = 4 for a layout
mismatch) without a rendezvous: a check that came after process-group start-up would
fail to connect here instead of printing the expected message. One case runs under a real
torchrun to show the whole job exits at once.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from torchtitan_disagmoe import train

REPO = Path(__file__).resolve().parents[2]


def _fake_checkpoint(folder: Path) -> None:
    """A complete DCP checkpoint of a model with other shapes (as another flavor would save)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"tok_embeddings.weight": torch.zeros(10, 4), "train_state.step": torch.tensor(3)},
             checkpoint_id=str(folder / "checkpoint" / "step-3"))


def _big_tokenizer(folder: Path) -> None:
    """A tokenizer.json with 5,000 tokens (the debug models have 2,048)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    folder.mkdir(parents=True)
    vocab = {f"w{i}": i for i in range(5000)}
    Tokenizer(WordLevel(vocab, unk_token="w0")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": None}))


def _setup_files(tmp: Path) -> None:
    (tmp / "bad.toml").write_text("[training\nsteps = 3\n")
    (tmp / "empty.txt").write_text("")
    (tmp / "no_text_here").mkdir()
    (tmp / "a_file").write_text("x")
    _fake_checkpoint(tmp / "other_model_run")
    _big_tokenizer(tmp / "big_tokenizer")


# (id, world size, arguments, words the message must contain)
CASES = [
    ("unknown key", 1, ["--training.stepz", "3"], ["training.stepz", "steps"]),
    ("unknown section", 1, ["--trainin.steps", "3"], ["[trainin]"]),
    ("wrong type", 1, ["--training.steps", "many"], ["training.steps", "many"]),
    ("wrong bool", 1, ["--checkpoint.enable", "maybe"], ["checkpoint.enable", "true or false"]),
    ("bad TOML", 1, ["--job.config_file", "{tmp}/bad.toml"], ["not valid TOML"]),
    ("missing config file", 1, ["--job.config_file", "{tmp}/nope.toml"], ["job.config_file", "no such file"]),
    ("negative steps", 1, ["--training.steps", "-1"], ["training.steps", "> 0"]),
    ("bad choice", 1, ["--disagmoe.mode", "split"], ["disagmoe.mode", "af_pipe"]),
    ("unknown flavor", 1, ["--model.flavor", "tiny"], ["tiny", "debug"]),
    ("seq_len above the model's maximum", 1, ["--training.seq_len", "100000"], ["seq_len", "100000"]),
    ("world size != attention + expert ranks", 4,
     ["--disagmoe.mode", "af_pipe", "--disagmoe.attention_ranks", "2", "--disagmoe.expert_ranks", "1"],
     ["attention_ranks", "expert_ranks", "4"]),
    ("expert ranks do not divide the experts", 4,
     ["--disagmoe.mode", "af_pipe", "--disagmoe.attention_ranks", "1", "--disagmoe.expert_ranks", "3"],
     ["expert_ranks", "experts"]),
    ("p larger than the layers", 10,
     ["--disagmoe.mode", "af_pipe", "--disagmoe.attention_ranks", "5", "--disagmoe.expert_ranks", "5",
      "--disagmoe.pipeline_depth", "5"], ["pipeline_depth", "layers"]),
    ("p does not divide the layers", 6,
     ["--disagmoe.mode", "af_pipe", "--disagmoe.attention_ranks", "3", "--disagmoe.expert_ranks", "3",
      "--disagmoe.pipeline_depth", "3"], ["pipeline_depth", "layers"]),
    ("micro-batches do not divide the batch", 2,
     ["--disagmoe.mode", "af_pipe", "--disagmoe.microbatches", "3", "--training.local_batch_size", "4"],
     ["disagmoe.microbatches", "local_batch_size"]),
    ("expert parallel does not divide the world", 4,
     ["--disagmoe.mode", "colocated", "--parallelism.expert_parallel_degree", "3"],
     ["expert_parallel_degree"]),
    ("dataset path missing", 1, ["--training.dataset", "text", "--training.dataset_path", "{tmp}/nowhere"],
     ["dataset_path", "does not exist"]),
    ("dataset needs a path", 1, ["--training.dataset", "jsonl"], ["training.dataset_path"]),
    ("empty dataset file", 1, ["--training.dataset", "text", "--training.dataset_path", "{tmp}/empty.txt"],
     ["training.dataset_path", "empty"]),
    ("dataset folder without data files", 1,
     ["--training.dataset", "text", "--training.dataset_path", "{tmp}/no_text_here"], ["dataset_path", ".txt"]),
    ("tokenizer vocabulary larger than the model's", 1, ["--model.tokenizer_path", "{tmp}/big_tokenizer"],
     ["5000", "vocab_size"]),
    ("tokenizer path not a folder", 1, ["--model.tokenizer_path", "{tmp}/a_file"], ["tokenizer_path"]),
    ("unwritable dump folder", 1, ["--job.dump_folder", "{tmp}/a_file/out"], ["job.dump_folder", "writable"]),
    ("checkpoint of an incompatible model", 1,
     ["--job.dump_folder", "{tmp}/other_model_run", "--checkpoint.enable", "true"],
     ["does not fit model", "tok_embeddings.weight", "job.dump_folder"]),
    ("zero timeout", 1, ["--comm.train_timeout_seconds", "0"], ["comm.train_timeout_seconds"]),
    ("unknown compile component", 1, ["--compile.enable", "true", "--compile.components", "attention,router"],
     ["compile.components", "router", "experts"]),
    ("bad selective checkpointing option", 1,
     ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "often"],
     ["activation_checkpoint.selective_ac_option", "'op' or a positive integer"]),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    _setup_files(tmp)
    return tmp


@pytest.mark.parametrize("name,world,args,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_any_process_group(files, monkeypatch, capsys, name, world, args, words):
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # any rendezvous attempt would fail, not hang
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("DISAGMOE_CACHE_DIR", str(files / "cache"))
    argv = ["--job.config_file", str(REPO / "train_configs" / "debug_model.toml"),
            "--job.dump_folder", str(files / "out"), "--metrics.enable_tensorboard", "false"]
    argv += [a.format(tmp=files) for a in args]
    assert train.main(argv) == 2
    message = capsys.readouterr().err
    assert message.startswith("configuration error:"), message
    for word in words:
        assert word in message, f"{name}: {word!r} not in {message!r}"
    assert not dist.is_initialized()


def test_incompatible_checkpoint_is_left_untouched(files):
    before = sorted(p.name for p in (files / "other_model_run" / "checkpoint" / "step-3").iterdir())
    assert ".metadata" in before


@pytest.mark.slow
def test_bad_input_under_torchrun_ends_every_rank_at_once(tmp_path):
    env = dict(os.environ, DISAGMOE_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "torchtitan_disagmoe.train",
         "--job.config_file", "train_configs/debug_model.toml", "--disagmoe.attention_ranks", "2",
         "--job.dump_folder", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("configuration error:") == 2  # both ranks, same message
    assert "disagmoe.attention_ranks" in proc.stderr
    assert time.monotonic() - start < 60
