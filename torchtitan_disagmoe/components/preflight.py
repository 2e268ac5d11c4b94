"""Checks of everything a job reads or writes outside its configuration, made on every
rank before any process group exists (so a bad input never leaves ranks waiting on
each other): the dataset files, the tokenizer's vocabulary, the dump folder, and a
checkpoint left by an incompatible model.

``JobConfig.validate`` covers the settings themselves; these checks touch the disk.
Each raises ``ValueError`` naming the setting and the fix.
"""

import re
import uuid
from pathlib import Path

import torch

from torchtitan_disagmoe.config.job_config import JobConfig
from torchtitan_disagmoe.data.corpus import list_data_files
from torchtitan_disagmoe.data.tokenizer import build_tokenizer, check_vocab
from torchtitan_disagmoe.models import get_model_spec

_STEP_DIR = re.compile(r"step-(\d+)$")
_NON_MODEL_PREFIXES = ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.")


def check_dataset(config: JobConfig) -> None:
    t = config.training
    if t.dataset == "pydoc_topics":
        return
    files = list_data_files(t.dataset, t.dataset_path)  # raises for a missing path or no files
    if all(f.stat().st_size == 0 for f in files):
        raise ValueError(f"training.dataset_path = {t.dataset_path!r}: every file is empty "
                         f"({len(files)} file(s)); point it at the training data")


def check_tokenizer(config: JobConfig, cache_dir: Path) -> None:
    """A user tokenizer must fit the model's embedding (the built-in one is built to fit)."""
    if not config.model.tokenizer_path:
        return
    args = get_model_spec(config.model.name).get_flavor(config.model.flavor)
    check_vocab(build_tokenizer(config.model.tokenizer_path, args.vocab_size, cache_dir), args.vocab_size)


def check_dump_folder(config: JobConfig) -> None:
    """The dump folder must be creatable and writable (metrics, checkpoints, traces)."""
    folder = Path(config.job.dump_folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"job.dump_folder = {str(folder)!r} is not writable ({e.strerror}); "
                         "choose a folder this user can write, e.g. --job.dump_folder ./outputs") from None


def latest_checkpoint(config: JobConfig) -> Path | None:
    """The newest complete DCP checkpoint in the checkpoint folder (the one a run resumes
    from). A save that crashed before writing ``.metadata`` (DCP writes it last) is not
    complete and is skipped."""
    folder = Path(config.job.dump_folder) / config.checkpoint.folder
    if not config.checkpoint.enable or not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / ".metadata").is_file()]
    return max(steps)[1] if steps else None


def check_checkpoint_matches_model(config: JobConfig) -> None:
    """A checkpoint the run would resume from must hold this model's parameters, by name
    and shape; otherwise DCP would fail after start-up, on some ranks only."""
    path = latest_checkpoint(config)
    if path is None:
        return
    from torch.distributed.checkpoint import FileSystemReader

    try:
        saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:
        raise ValueError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e}); move it away or "
                         "set checkpoint.folder to another folder") from None
    spec = get_model_spec(config.model.name)
    with torch.device("meta"):
        model = spec.model_cls(spec.get_flavor(config.model.flavor))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(m.size) for name, m in saved.items()
             if not name.startswith(_NON_MODEL_PREFIXES) and hasattr(m, "size")}
    problems = []
    if missing := sorted(set(expected) - set(found)):
        problems.append(f"{len(missing)} parameter(s) missing (e.g. {missing[0]})")
    if unexpected := sorted(set(found) - set(expected)):
        problems.append(f"{len(unexpected)} unknown parameter(s) (e.g. {unexpected[0]})")
    if wrong := [n for n in sorted(set(expected) & set(found)) if expected[n] != found[n]]:
        n = wrong[0]
        problems.append(f"{len(wrong)} shape mismatch(es) (e.g. {n}: saved {list(found[n])}, "
                        f"model {list(expected[n])})")
    if problems:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit model {config.model.name}/{config.model.flavor}: "
            f"{'; '.join(problems)}. Resume with the model it was saved with, or start fresh with another "
            "job.dump_folder or checkpoint.folder (nothing is deleted)")


def preflight(config: JobConfig, cache_dir: Path) -> None:
    """All checks; every rank runs them before starting its process group."""
    check_dump_folder(config)
    check_dataset(config)
    check_tokenizer(config, cache_dir)
    check_checkpoint_matches_model(config)
