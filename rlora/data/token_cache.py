"""Tokenised training rows on disk, built once per data version and memory-mapped by every process.

Layout: ``<root>/<key>/`` holds ``meta.json`` (task names, rows, truncated rows, the fingerprint's
inputs) and one Arrow IPC file per task, ``task-<t>.arrow``, with the columns

    input_ids  list<int32>   prompt ids + answer ids (answer = target tokens + eos), <= max_length
    prompt_len int32         the labels are -100 on the first prompt_len positions, input_ids after
    truncated  uint8         1 when the row was cut to max_length

written in record batches of ``CHUNK_ROWS`` rows while the source is read (a source larger than memory
streams through). ``<root>`` is ``$RLORA_TOKEN_CACHE`` or ``$RLORA_CACHE/tokens`` (default
``~/.cache/rlora/tokens``); removing it (or one ``<key>`` folder) clears the cache.

Readers map the files (``pyarrow.memory_map``) and index the buffers in place: a row read is a slice of
the mapped file, and every process of a node shares the same page-cache pages (no copy per rank). A
row comes back as the dict :func:`rlora.data.tokenization.encode_example` makes, so the batches are the
ones of the in-memory path.

The key is a hash of everything that decides the tokens (:func:`cache_key`): each source file's
resolved path, size and modification time (``stat``, so checking 1M rows costs microseconds, not a
read; an edit changes the mtime, ``touch`` forces a rebuild), the row limits, the task names and
prompt templates, ``max_length``, ``use_chat_template``, the tokenizer (a hash of its full
serialisation -- vocabulary, merges, normaliser, special tokens -- and its chat template) and the
source of the code that turns rows into tokens.

One builder per node: the first process takes an exclusive lock (``<key>.lock``), builds into a
private temporary folder and renames it to ``<key>`` when complete; the others wait on the lock and
then map the finished folder. A builder that dies leaves no ``<key>`` folder, so the next one builds.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .errors import DataError

FORMAT = 1
CHUNK_ROWS = 4096
ANSWER_MEMO = 65536  # distinct answers kept tokenised per task (free-form tasks can have one per row)
META = "meta.json"
_CODE_FILES = ("tokenization.py", "prompts.py", "example.py", "jsonl.py", "hf_source.py", "loading.py",
               "token_cache.py")
log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$RLORA_TOKEN_CACHE``, else ``$RLORA_CACHE/tokens`` (``~/.cache/rlora/tokens``)."""
    from ..models import cache_root as rlora_cache

    env = os.environ.get("RLORA_TOKEN_CACHE")
    return Path(env).expanduser() if env else rlora_cache() / "tokens"


# ---- the key ----------------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation (fast tokenizers) or vocabulary (others), its class,
    special token ids and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id,
             tokenizer.bos_token_id, tokenizer.pad_token_id, getattr(tokenizer, "add_bos_token", None),
             getattr(tokenizer, "add_eos_token", None)]
    h.update(json.dumps(extra, default=str).encode())
    return h.hexdigest()


def _code_hash() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def _file_stat(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def key_material(data_cfg, tokenizer, specs: Optional[Sequence] = None) -> dict:
    """Everything that decides the tokenised rows (the input of :func:`cache_key`)."""
    from .loading import row_cap, source_files, task_specs

    specs = list(specs if specs is not None else task_specs(data_cfg))
    tasks = [{"name": s.name, "template": s.prompt_template, "hf_source": s.hf_source,
              "columns": dict(s.columns or {}), "cap": row_cap(s, data_cfg, "train"),
              "files": [_file_stat(p) for p in source_files(s, data_cfg, "train")]} for s in specs]
    return {"format": FORMAT, "code": _code_hash(), "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_length": int(data_cfg.max_length), "use_chat_template": bool(data_cfg.use_chat_template),
            "tasks": tasks}


def cache_key(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


# ---- reading ----------------------------------------------------------------------------------------
class CachedTask(Sequence):
    """The rows of one task, read from its mapped Arrow file; ``task[i]`` is the dict
    ``{"input_ids": [...], "labels": [...], "truncated": bool}`` of row ``i`` (as ``encode_example``)."""

    def __init__(self, name: str, path: Path, num_truncated: int = 0) -> None:
        import pyarrow as pa

        self.name, self.path, self.num_truncated = name, Path(path), int(num_truncated)
        self._map = pa.memory_map(str(path), "r")
        reader = pa.ipc.open_file(self._map)
        self._values, self._offsets, self._prompt, self._trunc, starts = [], [], [], [], [0]
        for i in range(reader.num_record_batches):
            b = reader.get_batch(i)
            ids = b.column(0)
            self._values.append(ids.values.to_numpy(zero_copy_only=True))
            self._offsets.append(ids.offsets.to_numpy(zero_copy_only=True))
            self._prompt.append(b.column(1).to_numpy(zero_copy_only=True))
            self._trunc.append(b.column(2).to_numpy(zero_copy_only=True))
            starts.append(starts[-1] + b.num_rows)
        self._starts = starts

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"row {index} of task {self.name} (it has {n} rows)")
        b = bisect.bisect_right(self._starts, i) - 1
        j = i - self._starts[b]
        lo, hi = self._offsets[b][j], self._offsets[b][j + 1]
        ids = self._values[b][lo:hi].tolist()
        p = int(self._prompt[b][j])
        return {"input_ids": ids, "labels": [-100] * p + ids[p:], "truncated": bool(self._trunc[b][j])}

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))


@dataclass
class TokenCache:
    """One built cache folder: ``tasks`` maps task name -> :class:`CachedTask` (run order);
    ``status`` says how this process got it: ``built``, ``waited`` (another process built it meanwhile)
    or ``reused``."""

    folder: Path
    meta: dict
    tasks: dict
    status: str = "reused"
    seconds: float = 0.0

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    @property
    def rows(self) -> int:
        return sum(len(t) for t in self.tasks.values())

    def note(self) -> str:
        """The console line for this run's data."""
        what = {"built": f"built in {self.seconds:.1f}s", "waited": f"built by another process ({self.seconds:.1f}s wait)",
                "reused": "reused (sources, tokenizer and max_length unchanged)"}[self.status]
        return f"[rlora] token cache {what}: {self.rows} rows of {len(self.tasks)} tasks in {self.folder}"


def open_cache(folder: Path, status: str = "reused", seconds: float = 0.0) -> TokenCache:
    meta = json.loads((folder / META).read_text())
    tasks = {t["name"]: CachedTask(t["name"], folder / t["file"], t["truncated"]) for t in meta["tasks"]}
    for t in meta["tasks"]:
        if len(tasks[t["name"]]) != t["rows"]:
            raise DataError(f"token cache {folder}: task {t['name']} has {len(tasks[t['name']])} rows, meta.json says "
                            f"{t['rows']}: remove {folder} (it is rebuilt on the next run)")
    return TokenCache(folder, meta, tasks, status, seconds)


def is_complete(folder: Path) -> bool:
    return (folder / META).is_file()


def lookup(data_cfg, tokenizer) -> tuple[Path, dict]:
    """``(folder, key material)`` of the cache for this data and tokenizer (the folder may not exist yet)."""
    material = key_material(data_cfg, tokenizer)
    return cache_root() / cache_key(material), material


def open_or_build(data_cfg, tokenizer) -> TokenCache:
    """Map the cache of this data + tokenizer, building it first if no process has (one builder at a time)."""
    folder, material = lookup(data_cfg, tokenizer)
    if is_complete(folder):
        return open_cache(folder, "reused")
    t0 = time.perf_counter()
    from ..models import file_lock

    with file_lock(folder.with_name(folder.name + ".lock")):
        if is_complete(folder):
            return open_cache(folder, "waited", time.perf_counter() - t0)
        build(folder, material, data_cfg, tokenizer)
    return open_cache(folder, "built", time.perf_counter() - t0)


# ---- building ---------------------------------------------------------------------------------------
def build(folder: Path, material: dict, data_cfg, tokenizer) -> None:
    """Tokenise every task into ``folder`` (through a temporary folder renamed at the end; the caller
    holds the lock)."""
    from .loading import iter_task, task_specs

    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # left by a builder that died
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        tasks = []
        for t, spec in enumerate(task_specs(data_cfg)):
            file = f"task-{t:04d}.arrow"
            rows, truncated, tokens = write_task(tmp / file, iter_task(spec, data_cfg, "train"), tokenizer,
                                                 int(data_cfg.max_length), bool(data_cfg.use_chat_template),
                                                 spec.prompt_template)
            tasks.append({"name": spec.name, "file": file, "rows": rows, "truncated": truncated, "tokens": tokens})
        meta = {"format": FORMAT, "key": folder.name, "material": material, "tasks": tasks,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _chunks(rows: Iterator, size: int) -> Iterator[list]:
    while True:
        chunk = list(itertools.islice(rows, size))
        if not chunk:
            return
        yield chunk


def write_task(path: Path, examples: Iterator, tokenizer, max_length: int, use_chat_template: bool,
               template: Optional[str]) -> tuple[int, int, int]:
    """Tokenise a stream of examples into one Arrow IPC file; returns (rows, truncated rows, tokens)."""
    import pyarrow as pa

    from .prompts import PromptRenderer
    from .tokenization import answer_token_ids, fit, prompt_token_ids

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("prompt_len", pa.int32()), ("truncated", pa.uint8())])
    render = PromptRenderer(tokenizer, use_chat_template, template)
    answers: dict[str, list[int]] = {}
    rows = truncated = tokens = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for chunk in _chunks(iter(examples), CHUNK_ROWS):
            prompt_ids = prompt_token_ids(tokenizer, [render(ex) for ex in chunk], use_chat_template)
            seqs, plens, cut = [], np.empty(len(chunk), np.int32), np.empty(len(chunk), np.uint8)
            for k, (ex, p) in enumerate(zip(chunk, prompt_ids)):
                a = answers.get(ex.target)
                if a is None:
                    if len(answers) >= ANSWER_MEMO:
                        answers.clear()
                    a = answers[ex.target] = answer_token_ids(tokenizer, ex.target, use_chat_template)
                p, a, was_cut = fit(p, a, max_length)
                seqs.append(p)
                seqs.append(a)
                plens[k], cut[k] = len(p), was_cut
            lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
            row_len = lengths[0::2] + lengths[1::2]
            offsets = np.zeros(len(chunk) + 1, np.int32)
            np.cumsum(row_len, out=offsets[1:])
            flat = np.fromiter(itertools.chain.from_iterable(seqs), np.int32, int(offsets[-1]))
            ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
            writer.write_batch(pa.record_batch([ids, pa.array(plens), pa.array(cut)], schema=schema))
            rows, truncated, tokens = rows + len(chunk), truncated + int(cut.sum()), tokens + int(offsets[-1])
    return rows, truncated, tokens


# ---- checking without tokenising ------------------------------------------------------------------
def check_rows(data_cfg, split: str = "train") -> dict[str, int]:
    """Read and validate every row of ``split`` as a stream (nothing is kept, nothing tokenised):
    ``task name -> rows`` after the limits. Bad rows raise the same one-line errors as loading."""
    from .loading import iter_task, task_specs

    return {s.name: sum(1 for _ in iter_task(s, data_cfg, split)) for s in task_specs(data_cfg)}


def cached_sizes(data_cfg, tokenizer) -> Optional[dict[str, int]]:
    """``task name -> rows`` from a complete cache of this data + tokenizer, without reading any row;
    ``None`` when it has not been built."""
    folder, _ = lookup(data_cfg, tokenizer)
    if not is_complete(folder):
        return None
    return {t["name"]: int(t["rows"]) for t in json.loads((folder / META).read_text())["tasks"]}


def clear(root: Optional[Path] = None) -> int:
    """Remove every cache folder under ``root`` (default :func:`cache_root`); returns how many."""
    root = Path(root) if root is not None else cache_root()
    if not root.is_dir():
        return 0
    n = 0
    for p in root.iterdir():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            n += not p.name.startswith(".")
        else:
            p.unlink(missing_ok=True)
    return n
