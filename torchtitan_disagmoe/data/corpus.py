"""Document sources for pretraining: where the raw text comes from.

A corpus is an iterator of documents (plain strings). The builtin corpus,
``pydoc_topics``, is the text of :mod:`pydoc_data.topics`, which ships with every
CPython, so a training run (and the tests) work with no download at all. Local
corpora can be given as ``.txt``, ``.jsonl`` or ``.parquet`` files, or directories
of them.

Every order here is deterministic (sorted keys, sorted file names) because the
token stream built from these documents is cached and shared across ranks: two
processes reading the same settings must see the same documents in the same order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DATASETS", "builtin_documents", "iter_documents", "list_data_files"]

BUILTIN_DATASET = "pydoc_topics"

# dataset name -> file suffixes accepted when dataset_path is a directory
# (None for the builtin corpus, which takes no path).
DATASETS: dict[str, tuple[str, ...] | None] = {
    BUILTIN_DATASET: None,
    "text": (".txt",),
    "jsonl": (".jsonl", ".json"),
    "parquet": (".parquet",),
}


def builtin_documents() -> list[str]:
    """Return the builtin corpus: one document per ``pydoc_data.topics`` entry.

    Returns:
        list[str]: ~80 documents (~0.5-0.75 MB of text depending on the Python
        version), in sorted topic-key order.
    """
    # Imported lazily: it is a large module and only needed for the builtin corpus.
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _check_dataset_name(dataset: str) -> tuple[str, ...] | None:
    if dataset not in DATASETS:
        raise ValueError(
            f"Unknown dataset={dataset!r}; allowed values: {sorted(DATASETS)}"
        )
    return DATASETS[dataset]


def list_data_files(dataset: str, dataset_path: str | os.PathLike | None) -> list[Path]:
    """Resolve ``dataset_path`` into the sorted list of files to read.

    Args:
        dataset: one of :data:`DATASETS` other than ``"pydoc_topics"``.
        dataset_path: a file, or a directory whose matching files (by suffix,
            non-recursive) are read in sorted name order.

    Returns:
        list[Path]: absolute, resolved file paths; never empty.
    """
    suffixes = _check_dataset_name(dataset)
    if suffixes is None:
        raise ValueError(f"dataset={dataset!r} is builtin and has no data files")
    if not dataset_path:
        raise ValueError(
            f"dataset={dataset!r} needs dataset_path (a file or a directory of "
            f"{'/'.join(suffixes)} files), but dataset_path is empty"
        )
    path = Path(dataset_path).expanduser().resolve()
    if path.is_file():
        return [path]
    if not path.exists():
        raise ValueError(f"training.dataset_path = {str(dataset_path)!r} does not exist")
    files = sorted(
        p for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes)
    )
    if not files:
        raise ValueError(
            f"training.dataset_path = {str(dataset_path)!r} holds no {'/'.join(suffixes)} "
            f"files for dataset={dataset!r}"
        )
    return files


def _iter_text(files: list[Path]) -> Iterator[str]:
    # One document per file: a file is the natural document boundary, and
    # splitting on blank lines would cut code listings and paragraphs apart.
    for path in files:
        yield path.read_text(encoding="utf-8")


def _iter_jsonl(files: list[Path]) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"dataset_path: {path}:{lineno} is not valid JSON: {e}"
                    ) from e
                if not isinstance(record, dict) or not isinstance(
                    record.get("text"), str
                ):
                    raise ValueError(
                        f"dataset_path: {path}:{lineno} has no string field "
                        f"'text' (dataset='jsonl' needs one JSON object per line "
                        f'like {{"text": "..."}})'
                    )
                yield record["text"]


def _iter_parquet(files: list[Path]) -> Iterator[str]:
    import pyarrow.parquet as pq

    for path in files:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ValueError(
                f"dataset_path: {path} has no column 'text' "
                f"(columns: {pf.schema_arrow.names})"
            )
        # Read one row group at a time so large files are never fully in memory.
        for batch in pf.iter_batches(columns=["text"]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text


def iter_documents(dataset: str, dataset_path: str | None) -> Iterator[str]:
    """Yield the documents of a corpus, in a deterministic order.

    Args:
        dataset: ``"pydoc_topics"`` (builtin, no path), ``"text"`` (one document
            per ``.txt`` file), ``"jsonl"`` (field ``"text"`` of each line of
            ``.jsonl``/``.json`` files) or ``"parquet"`` (column ``"text"``).
        dataset_path: file or directory for the file-based datasets; must be
            empty/None for ``"pydoc_topics"``.

    Returns:
        Iterator[str]: the documents. Raises ValueError (eagerly, before the
        first document) on bad settings, and if the corpus turns out empty.
    """
    suffixes = _check_dataset_name(dataset)
    if suffixes is None:
        if dataset_path:
            raise ValueError(
                f"dataset={dataset!r} is builtin and takes no dataset_path, "
                f"got dataset_path={dataset_path!r}; set dataset to one of "
                f"{sorted(d for d, s in DATASETS.items() if s)} to read files"
            )
        docs: Iterator[str] = iter(builtin_documents())
        where = "the builtin corpus"
    else:
        files = list_data_files(dataset, dataset_path)
        reader = {"text": _iter_text, "jsonl": _iter_jsonl, "parquet": _iter_parquet}
        docs = reader[dataset](files)
        where = f"training.dataset_path = {str(dataset_path)!r}"
    # Validate paths now (above) rather than at first next(); the empty check
    # needs the generator, so it is done lazily in a wrapper.
    return _non_empty(docs, dataset, where)


def _non_empty(docs: Iterator[str], dataset: str, where: str) -> Iterator[str]:
    count = 0
    for doc in docs:
        if doc:
            count += 1
            yield doc
    if count == 0:
        raise ValueError(
            f"Empty corpus: dataset={dataset!r} at {where} yielded no non-empty "
            "documents"
        )
