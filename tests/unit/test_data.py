"""Unit tests for the data pipeline: corpus readers, tokenizer, DP-invariant loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from torchtitan_disagmoe.data.corpus import builtin_documents, iter_documents
from torchtitan_disagmoe.data.dataloader import (
    GlobalBatchDataLoader,
    build_dataloader,
    build_token_stream,
)
from torchtitan_disagmoe.data.tokenizer import build_tokenizer, check_vocab

VOCAB = 512


@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tok_cache")


@pytest.fixture(scope="module")
def tokenizer(tok_cache: Path):
    return build_tokenizer(None, VOCAB, tok_cache)


# ---------------------------------------------------------------- corpus


def test_builtin_corpus_nonempty() -> None:
    docs = builtin_documents()
    assert len(docs) > 50
    assert all(isinstance(d, str) and d for d in docs)
    assert sum(map(len, docs)) > 100_000
    assert list(iter_documents("pydoc_topics", None)) == docs
    assert list(iter_documents("pydoc_topics", "")) == docs


def test_text_dataset(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second doc\n\nwith a blank line")
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "ignored.md").write_text("not text")
    assert list(iter_documents("text", str(tmp_path))) == [
        "first doc",
        "second doc\n\nwith a blank line",
    ]
    assert list(iter_documents("text", str(tmp_path / "a.txt"))) == ["first doc"]


def test_jsonl_dataset(tmp_path: Path) -> None:
    rows = [{"text": "alpha", "id": 1}, {"text": "beta"}]
    lines = "\n".join(json.dumps(r) for r in rows)
    (tmp_path / "1.jsonl").write_text(lines + "\n\n")
    (tmp_path / "2.json").write_text(json.dumps({"text": "gamma"}) + "\n")
    assert list(iter_documents("jsonl", str(tmp_path))) == ["alpha", "beta", "gamma"]


def test_parquet_dataset(tmp_path: Path) -> None:
    table = pa.table({"text": ["p1", "p2"], "n": [1, 2]})
    pq.write_table(table, tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["p3"]}), tmp_path / "b.parquet")
    assert list(iter_documents("parquet", str(tmp_path))) == ["p1", "p2", "p3"]


def test_bad_corpus_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dataset=.*allowed"):
        iter_documents("c4", None)
    with pytest.raises(ValueError, match="dataset_path"):
        iter_documents("pydoc_topics", str(tmp_path))
    with pytest.raises(ValueError, match="dataset_path"):
        iter_documents("text", None)
    with pytest.raises(ValueError, match="dataset_path.*does not exist"):
        iter_documents("text", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="dataset_path.*no .txt"):
        iter_documents("text", str(tmp_path))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2.*'text'"):
        list(iter_documents("jsonl", str(tmp_path)))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="Empty corpus"):
        list(iter_documents("text", str(tmp_path / "empty.txt")))


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_cached_and_deterministic(
    tmp_path: Path, tokenizer, tok_cache: Path
) -> None:
    tok_dir = tok_cache / f"builtin_bpe_v{VOCAB}"
    first = (tok_dir / "tokenizer.json").read_bytes()
    mtime = (tok_dir / "tokenizer.json").stat().st_mtime_ns
    again = build_tokenizer(None, VOCAB, tok_cache)  # reuses the cached files
    assert (tok_dir / "tokenizer.json").stat().st_mtime_ns == mtime
    assert again.get_vocab_size() == tokenizer.get_vocab_size() == VOCAB
    build_tokenizer(None, VOCAB, tmp_path)  # independent build
    assert (tmp_path / f"builtin_bpe_v{VOCAB}" / "tokenizer.json").read_bytes() == first
    # No temp dirs left behind.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        f"builtin_bpe_v{VOCAB}"
    ]
    # Loading from an explicit path gives the same tokenizer.
    loaded = build_tokenizer(str(tok_dir), 0, tmp_path / "unused")
    assert loaded.encode("def f(x): pass") == tokenizer.encode("def f(x): pass")


def test_tokenizer_roundtrip(tokenizer) -> None:
    text = "The `for` statement iterates over sequences. Ünïcode ✓ 42\n\ttab"
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.bos_id != tokenizer.eos_id
    assert tokenizer.decode(ids[1:-1]) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert max(ids) < VOCAB


def test_tokenizer_bad_inputs(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_tokenizer(None, 100, tmp_path)
    with pytest.raises(ValueError, match="tokenizer_path"):
        build_tokenizer(str(tmp_path / "nope"), VOCAB, tmp_path)
    check_vocab(tokenizer, VOCAB)
    with pytest.raises(ValueError, match=r"512.*256.*model\.flavor"):
        check_vocab(tokenizer, 256)


# ---------------------------------------------------------------- dataloader


def test_token_stream_cached(tokenizer, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("hello world")
    (tmp_path / "data" / "b.txt").write_text("second")
    data, cache = str(tmp_path / "data"), tmp_path / "c"
    stream = build_token_stream("text", data, tokenizer, cache)
    expected = [
        t
        for doc in ["hello world", "second"]
        for t in tokenizer.encode(doc, add_bos=True, add_eos=True)
    ]
    assert stream.dtype == np.uint32 and stream.ndim == 1
    assert stream.tolist() == expected
    again = build_token_stream("text", data, tokenizer, cache)
    assert isinstance(again, np.memmap)
    assert again.tolist() == expected
    # Changing a data file invalidates the cache.
    (tmp_path / "data" / "b.txt").write_text("changed content")
    changed = build_token_stream("text", data, tokenizer, cache)
    assert changed.tolist() != expected
    assert len(list(cache.glob("*.npy"))) == 2


def _collect(tokens: np.ndarray, local_bs: int, dp: int, steps: int, seed: int = 3):
    """Per step, the concatenation over ranks (in rank order) of their batches."""
    loaders = [
        GlobalBatchDataLoader(tokens, 8, local_bs, r, dp, seed) for r in range(dp)
    ]
    out = []
    for _ in range(steps):
        parts = [next(ld) for ld in loaders]
        out.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    return out


def test_global_batch_contract_across_dp_degrees() -> None:
    # 10 samples of seq_len 8 and a global batch of 4: step 2 straddles the
    # epoch boundary and steps 3-4 are in epoch 1.
    tokens = np.arange(10 * 8 + 1, dtype=np.uint32)
    ref = _collect(tokens, 4, 1, 5)
    for local_bs, dp in [(2, 2), (1, 4)]:
        got = _collect(tokens, local_bs, dp, 5)
        for (xi, yi), (xr, yr) in zip(got, ref):
            assert torch.equal(xi, xr) and torch.equal(yi, yr)
    starts = [int(x[0]) for step in ref for x in step[0]]
    # Epoch 0 (first 10 entries) and epoch 1 are each a permutation of all samples.
    assert sorted(starts[:10]) == [8 * i for i in range(10)]
    assert sorted(starts[10:20]) == [8 * i for i in range(10)]
    assert starts[:10] != starts[10:20]
    # A different seed gives a different order.
    other = _collect(tokens, 4, 1, 1, seed=4)
    assert not torch.equal(other[0][0], ref[0][0])


def test_batch_shapes_and_labels(tokenizer, tmp_path: Path) -> None:
    loader = build_dataloader(
        "pydoc_topics", None, tokenizer, 32, 3, 0, 1, seed=0, cache_dir=tmp_path
    )
    stream = np.asarray(loader.tokens)
    for _ in range(3):
        x, y = next(loader)
        assert x.shape == y.shape == (3, 32)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            # Each row is a window of the stream starting at a multiple of seq_len.
            window = np.concatenate([row_x.numpy(), row_y[-1:].numpy()])
            assert any(
                np.array_equal(stream[s : s + 33], window)
                for s in range(0, stream.size - 32, 32)
            )
    assert int(stream.max()) < VOCAB
    assert stream[0] == tokenizer.bos_id


def test_resume_matches_uninterrupted() -> None:
    tokens = np.arange(7 * 16 + 5, dtype=np.uint32)
    full = GlobalBatchDataLoader(tokens, 16, 2, 1, 2, seed=11)
    expected = [next(full) for _ in range(8)]
    first = GlobalBatchDataLoader(tokens, 16, 2, 1, 2, seed=11)
    for _ in range(3):
        next(first)
    state = first.state_dict()
    assert state["batches_consumed"] == 3
    resumed = GlobalBatchDataLoader(tokens, 16, 2, 1, 2, seed=11)
    resumed.load_state_dict(state)
    for want in expected[3:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # Same global batch under a different DP degree resumes too (rank 0 of 1
    # sees ranks 0 and 1 of the 2-rank run).
    single = GlobalBatchDataLoader(tokens, 16, 4, 0, 1, seed=11)
    single.load_state_dict(state)
    assert torch.equal(next(single)[0][2:], expected[3][0])


def test_loader_rejects_bad_settings() -> None:
    tokens = np.arange(5 * 8 + 1, dtype=np.uint32)
    loader = GlobalBatchDataLoader(tokens, 8, 2, 0, 2, seed=0)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seq_len=8.*seq_len=4"):
        GlobalBatchDataLoader(tokens, 4, 2, 0, 2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size=4.*global_batch_size=2"):
        GlobalBatchDataLoader(tokens, 8, 1, 0, 2, seed=0).load_state_dict(state)
    too_big = r"5 samples.*global batch of 6.*smaller seq_len"
    with pytest.raises(ValueError, match=too_big):
        GlobalBatchDataLoader(tokens, 8, 3, 0, 2, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        GlobalBatchDataLoader(tokens, 8, 1, 2, 2, seed=0)
