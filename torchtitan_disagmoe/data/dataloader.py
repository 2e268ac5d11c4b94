"""Pretraining data pipeline: token stream cache and a DP-invariant batch loader.

``build_token_stream`` encodes a corpus once (bos + document + eos, concatenated)
and caches it as a ``.npy`` that every rank memory-maps. ``GlobalBatchDataLoader``
cuts the stream into fixed-length samples and orders them by a seeded permutation
defined over the *global* batch, so the sequences seen at step k depend only on
(seed, seq_len, global batch size) and not on how many data-parallel ranks split
the batch. That makes runs with different DP degrees directly comparable, and
lets a checkpoint resume under a different DP degree with the same global batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from torchtitan_disagmoe.data.corpus import (
    DATASETS,
    builtin_documents,
    iter_documents,
    list_data_files,
)
from torchtitan_disagmoe.data.tokenizer import file_lock

__all__ = ["GlobalBatchDataLoader", "build_dataloader", "build_token_stream"]

logger = logging.getLogger(__name__)

# Bump when the stream layout changes so stale caches are not reused.
_STREAM_FORMAT = 1


def _stream_cache_key(
    dataset: str, dataset_path: str | None, tokenizer: HuggingFaceTokenizer
) -> str:
    """Hash everything the token stream depends on."""
    if DATASETS.get(dataset, ()) is None:
        # The builtin corpus changes with the Python version: hash its text.
        source: Any = hashlib.sha256(
            "\0".join(builtin_documents()).encode("utf-8")
        ).hexdigest()
    else:
        # (path, size, mtime) is the usual cheap change detector for data files.
        source = [
            [str(p), st.st_size, st.st_mtime_ns]
            for p in list_data_files(dataset, dataset_path)
            for st in [p.stat()]
        ]
    # The serialized tokenizer is the tokenizer.json content (plus any special
    # tokens added from tokenizer_config.json), whatever files it was loaded from.
    tok_hash = hashlib.sha256(tokenizer.tokenizer.to_str().encode("utf-8")).hexdigest()
    meta = {
        "format": _STREAM_FORMAT,
        "dataset": dataset,
        "source": source,
        "tokenizer": tok_hash,
        "bos": tokenizer.bos_id,
        "eos": tokenizer.eos_id,
    }
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]


def _encode_corpus(
    dataset: str, dataset_path: str | None, tokenizer: HuggingFaceTokenizer
) -> np.ndarray:
    pieces = [
        np.asarray(tokenizer.encode(doc, add_bos=True, add_eos=True), dtype=np.uint32)
        for doc in iter_documents(dataset, dataset_path)
    ]
    return np.concatenate(pieces)


def build_token_stream(
    dataset: str,
    dataset_path: str | None,
    tokenizer: HuggingFaceTokenizer,
    cache_dir: str | os.PathLike,
) -> np.ndarray:
    """Encode a corpus into one token stream, cached on disk.

    Args:
        dataset: corpus name, see :func:`corpus.iter_documents`.
        dataset_path: file/directory for file-based datasets, else None/empty.
        tokenizer: must define ``eos_id`` (documents are separated by it);
            ``bos_id`` is prepended to each document when defined.
        cache_dir: directory for ``tokens_{dataset}_{hash}.npy``.

    Returns:
        np.ndarray: uint32, shape [num_tokens]; read-only memory map when it
        came from the cache.
    """
    if tokenizer.eos_id is None:
        raise ValueError(
            "The tokenizer has no eos token (tokenizer_config.json must name "
            "eos_token); documents could not be separated in the token stream"
        )
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    key = _stream_cache_key(dataset, dataset_path, tokenizer)
    target = cache / f"tokens_{dataset}_{key}.npy"
    if not target.is_file():
        with file_lock(cache / f".tokens_{dataset}_{key}.lock"):
            # Re-check under the lock: another rank may have written it meanwhile.
            if not target.is_file():
                tokens = _encode_corpus(dataset, dataset_path, tokenizer)
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=cache)
                try:
                    with os.fdopen(fd, "wb") as f:
                        np.save(f, tokens)
                    # mkstemp makes the file private (0600); a cache may be shared.
                    os.chmod(tmp, 0o644)
                    os.replace(tmp, target)
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
                logger.info(
                    "Cached %d tokens of %s at %s", tokens.size, dataset, target
                )
    return np.load(target, mmap_mode="r")


class GlobalBatchDataLoader(Stateful):
    """Endless loader of ``(inputs, labels)`` whose global batches ignore DP degree.

    Sample i is ``tokens[i*seq_len : i*seq_len + seq_len + 1]`` (consecutive
    samples share one boundary token, so every token is a label exactly once).
    Epoch e visits all samples in the order ``default_rng(seed + e).permutation``;
    epochs are concatenated into one endless order, and global batch k is the
    k-th run of ``local_batch_size * dp_degree`` entries of it (a batch may
    straddle an epoch boundary). Rank r takes the r-th contiguous slice of
    ``local_batch_size`` samples, so concatenating all ranks' step-k batches in
    rank order equals the step-k batch of a single process with the full global
    batch.

    Args:
        tokens: 1-D integer token stream (e.g. from :func:`build_token_stream`).
        seq_len: tokens per training sequence.
        local_batch_size: sequences per rank per step.
        dp_rank: this rank's data-parallel index in ``[0, dp_degree)``.
        dp_degree: number of data-parallel ranks.
        seed: base seed of the per-epoch permutations.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        local_batch_size: int,
        dp_rank: int,
        dp_degree: int,
        seed: int,
    ) -> None:
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if seq_len < 1 or local_batch_size < 1 or dp_degree < 1:
            raise ValueError(
                f"seq_len ({seq_len}), local_batch_size ({local_batch_size}) and "
                f"dp_degree ({dp_degree}) must all be >= 1"
            )
        if not 0 <= dp_rank < dp_degree:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_degree={dp_degree})")
        self.tokens = tokens
        self.seq_len = seq_len
        self.local_batch_size = local_batch_size
        self.dp_rank = dp_rank
        self.dp_degree = dp_degree
        self.seed = seed
        self.global_batch_size = local_batch_size * dp_degree
        # The last sample needs seq_len + 1 tokens starting at i*seq_len.
        self.num_samples = max(0, (tokens.size - 1) // seq_len)
        if self.num_samples < self.global_batch_size:
            raise ValueError(
                f"The corpus has {tokens.size} tokens = {self.num_samples} samples "
                f"of seq_len={seq_len}, fewer than one global batch of "
                f"{self.global_batch_size} (local_batch_size={local_batch_size} x "
                f"dp_degree={dp_degree}); use a smaller seq_len or "
                "local_batch_size, or more data"
            )
        self.batches_consumed = 0
        # Permutations of recently used epochs; a batch touches at most two.
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng(self.seed + epoch)
            perm = rng.permutation(self.num_samples)
            # Steps only move forward (or jump on load), so older epochs are dead.
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return perm

    def _sample_indices(self, step: int) -> list[int]:
        """Sample indices of this rank's slice of global batch ``step``."""
        start = step * self.global_batch_size + self.dp_rank * self.local_batch_size
        indices = []
        for pos in range(start, start + self.local_batch_size):
            epoch, offset = divmod(pos, self.num_samples)
            indices.append(int(self._permutation(epoch)[offset]))
        return indices

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return this rank's next batch.

        Returns:
            (inputs, labels): torch.int64, each [local_batch_size, seq_len];
            ``labels[:, t] == inputs[:, t + 1]`` within the sample's tokens.
        """
        L = self.seq_len
        indices = self._sample_indices(self.batches_consumed)
        # [local_batch_size, seq_len + 1]; astype copies the rows out of the mmap.
        rows = np.stack([self.tokens[i * L : i * L + L + 1] for i in indices])
        rows = rows.astype(np.int64)
        self.batches_consumed += 1
        batch = torch.from_numpy(rows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        """Position plus the settings it is only meaningful under.

        The state is the same on every rank (it counts global batches), so it
        can be restored under a different DP degree with the same global batch.
        """
        return {
            "batches_consumed": self.batches_consumed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at ``state_dict["batches_consumed"]``.

        Raises ValueError if the state was saved with a different seq_len or
        global batch size (step k would then mean different data).
        """
        for name in ("seq_len", "global_batch_size"):
            saved, now = state_dict.get(name), getattr(self, name)
            if saved is not None and int(saved) != now:
                raise ValueError(
                    f"Dataloader checkpoint was saved with {name}={saved} but this "
                    f"run has {name}={now}; resuming would replay different data. "
                    f"Use the original {name} (global batch size = "
                    "local_batch_size x dp_degree), or start the data from scratch"
                )
        # A changed seed or corpus is allowed (e.g. switching data mid-run) but
        # the resumed order is then not the one the checkpointed run would see.
        for name in ("seed", "num_samples"):
            saved = state_dict.get(name)
            if saved is not None and int(saved) != getattr(self, name):
                logger.warning(
                    "Dataloader checkpoint has %s=%s, this run has %s; continuing "
                    "at the saved step with the new order",
                    name, saved, getattr(self, name),
                )
        if "batches_consumed" not in state_dict:
            raise ValueError("Dataloader state_dict has no 'batches_consumed'")
        self.batches_consumed = int(state_dict["batches_consumed"])


def build_dataloader(
    dataset: str,
    dataset_path: str | None,
    tokenizer: HuggingFaceTokenizer,
    seq_len: int,
    local_batch_size: int,
    dp_rank: int,
    dp_degree: int,
    seed: int,
    cache_dir: str | os.PathLike,
) -> GlobalBatchDataLoader:
    """Build (or load from cache) the token stream and wrap it in a loader.

    Args:
        dataset, dataset_path: corpus selection, see :func:`corpus.iter_documents`.
        tokenizer: tokenizer used to encode the corpus.
        seq_len, local_batch_size, dp_rank, dp_degree, seed: see
            :class:`GlobalBatchDataLoader`.
        cache_dir: directory for the cached token stream.

    Returns:
        GlobalBatchDataLoader: yields int64 ``(inputs, labels)`` of shape
        [local_batch_size, seq_len].
    """
    tokens = build_token_stream(dataset, dataset_path, tokenizer, cache_dir)
    return GlobalBatchDataLoader(
        tokens, seq_len, local_batch_size, dp_rank, dp_degree, seed
    )
