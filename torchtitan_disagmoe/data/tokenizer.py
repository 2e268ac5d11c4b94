"""Tokenizer construction: load a HuggingFace tokenizer, or train a small builtin one.

Runs need a tokenizer but must not need a download, so when no ``tokenizer_path``
is given a byte-level BPE is trained on the builtin corpus (``pydoc_topics``,
well under a second) and cached under ``cache_dir``. The result is returned as
torchtitan's :class:`HuggingFaceTokenizer`, so the rest of the stack sees the same
type it would for a pretrained tokenizer directory.

Caches in this package (here and in ``dataloader.py``) follow one rule, since all
torchrun ranks may build the same entry at once: build under an ``fcntl`` lock
into a temp path next to the target, then ``os.replace`` it into place. A reader
therefore sees either nothing or a complete entry, never a half-written one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torchtitan.components.tokenizer import HuggingFaceTokenizer

from torchtitan_disagmoe.data.corpus import builtin_documents

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "build_tokenizer",
    "check_vocab",
    "file_lock",
]

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
_SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
# A byte-level BPE starts from all 256 byte symbols plus the special tokens; a
# smaller vocab could not represent arbitrary text.
_MIN_VOCAB_SIZE = 256 + len(_SPECIAL_TOKENS)


@contextlib.contextmanager
def file_lock(lock_path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``lock_path`` (created if missing).

    The lock is released when the process dies, so a crashed builder never
    leaves other ranks waiting forever.
    """
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _is_complete(tok_dir: Path) -> bool:
    return (tok_dir / "tokenizer.json").is_file() and (
        tok_dir / "tokenizer_config.json"
    ).is_file()


def _train_builtin_bpe(out_dir: Path, vocab_size: int) -> None:
    """Train a byte-level BPE on the builtin corpus and save it into ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    docs = builtin_documents()
    tok = Tokenizer(models.BPE())
    # GPT-2 style byte-level BPE: any UTF-8 text is representable (no unknown
    # tokens) and decode(encode(text)) == text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Training is deterministic for a fixed corpus order and vocab size (ties in
    # merge counts are broken by pair ids), which the tests check.
    tok.train_from_iterator(docs, trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)

    # torchtitan's HuggingFaceTokenizer reads bos/eos from this file. BOS/EOS are
    # not added by default; the data pipeline asks for them explicitly.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n"
    )
    # Provenance only (not read back): pydoc_data.topics differs between Python
    # versions, so the same vocab_size can give different tokenizers on hosts
    # with different Pythons. Keeping the cached entry (rather than rebuilding)
    # keeps token ids stable for checkpoints trained with it.
    corpus_hash = hashlib.sha256("\0".join(docs).encode("utf-8")).hexdigest()
    info = {
        "corpus": "pydoc_topics",
        "corpus_sha256": corpus_hash,
        "python": sys.version.split()[0],
        "vocab_size_requested": vocab_size,
        "vocab_size": tok.get_vocab_size(),
    }
    (out_dir / "build_info.json").write_text(
        json.dumps(info, indent=2, sort_keys=True) + "\n"
    )


def build_tokenizer(
    tokenizer_path: str | None,
    vocab_size: int,
    cache_dir: str | os.PathLike,
) -> HuggingFaceTokenizer:
    """Load a tokenizer directory, or train (once) and load the builtin BPE.

    Args:
        tokenizer_path: directory holding ``tokenizer.json`` (and usually
            ``tokenizer_config.json`` naming bos/eos). If empty/None, the builtin
            byte-level BPE is used.
        vocab_size: target vocabulary size of the builtin BPE (including 3
            special tokens); ignored when ``tokenizer_path`` is given. The trained
            vocabulary can be smaller if the corpus runs out of merges.
        cache_dir: where the builtin BPE is stored, as
            ``cache_dir/builtin_bpe_v{vocab_size}/``; reused when present.

    Returns:
        HuggingFaceTokenizer: with ``bos_id``/``eos_id`` set.
    """
    if tokenizer_path:
        path = Path(tokenizer_path).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"model.tokenizer_path = {str(tokenizer_path)!r} is not a directory; it "
                "must hold tokenizer.json (+ tokenizer_config.json), or be empty "
                "to use the builtin BPE"
            )
        try:
            return HuggingFaceTokenizer(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"model.tokenizer_path = {str(tokenizer_path)!r}: {e}") from e

    if vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for the builtin byte-level BPE "
            f"(needs >= {_MIN_VOCAB_SIZE}: 256 bytes + {len(_SPECIAL_TOKENS)} "
            "special tokens)"
        )
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"builtin_bpe_v{vocab_size}"
    if not _is_complete(target):
        with file_lock(cache / f".builtin_bpe_v{vocab_size}.lock"):
            # Re-check under the lock: another rank may have built it meanwhile.
            if not _is_complete(target):
                tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
                try:
                    _train_builtin_bpe(tmp, vocab_size)
                    # mkdtemp makes the dir private (0700); a cache may be shared.
                    os.chmod(tmp, 0o755)
                    if target.exists():
                        # Only possible if someone left a partial dir by hand;
                        # nobody else writes it while we hold the lock.
                        shutil.rmtree(target)
                    os.replace(tmp, target)
                finally:
                    if tmp.exists():
                        shutil.rmtree(tmp)
    return HuggingFaceTokenizer(str(target))


def check_vocab(tokenizer: HuggingFaceTokenizer, model_vocab_size: int) -> None:
    """Raise ValueError if token ids could overflow the model's embedding table.

    Args:
        tokenizer: any tokenizer with ``get_vocab_size()``.
        model_vocab_size: rows of the model's embedding / output projection.
    """
    tok_vocab = tokenizer.get_vocab_size()
    if tok_vocab > model_vocab_size:
        raise ValueError(
            f"Tokenizer vocabulary ({tok_vocab} tokens) is larger than the model "
            f"vocab_size ({model_vocab_size}); token ids >= {model_vocab_size} "
            "would index past the embedding table. Pick a model.flavor with "
            f"vocab_size >= {tok_vocab}, or use a smaller tokenizer (builtin BPE "
            f"with vocab_size <= {model_vocab_size})."
        )
