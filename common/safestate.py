"""Training state without pickle: tensors in safetensors files, everything else in one JSON file.

A run folder is read back on every resume, and resume is automatic, so nothing in it may be able to run code when
loaded: `torch.load(weights_only=False)` (pickle) on a planted file would. Here the state is a tree of dicts, lists,
tuples, str/int/float/bool/None, torch tensors and NumPy arrays (the RNG state); the JSON file holds the tree with
each tensor replaced by a reference into `<name>.safetensors` (sharded past `max_shard_bytes`). Reading parses
JSON and safetensors only. Round trips are exact: tensors bit for bit, floats through `repr` (NaN and inf
included), int keys and tuples tagged.

DeepSpeed's own shard files are pickles that its engine reads with torch.load; `safe_torch_load` reads them with
`weights_only=True` and an explicit allow-list of the few DeepSpeed classes they hold (see common/loop.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_JSON = "state.json"
_T, _TUPLE, _DICT, _ND = "__tensor__", "__tuple__", "__dict__", "__ndarray__"


class UnsafeStateError(ValueError):
    """A state file is not in the expected pickle-free format (or not readable as such); nothing was executed."""


def _encode(obj: Any, tensors: list[torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {_T: len(tensors) - 1}
    if isinstance(obj, np.ndarray):
        return {_ND: obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {_DICT: [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in obj.items()]}
    raise TypeError(f"{where}: cannot store a {type(obj).__name__} in a pickle-free state file")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _T in obj:
        return tensors[f"t{obj[_T]}"]
    if _TUPLE in obj:
        return tuple(_decode(v, tensors) for v in obj[_TUPLE])
    if _DICT in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj[_DICT]}
    if _ND in obj:
        return np.asarray(obj[_ND], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, list) else k


def _writable(t: torch.Tensor, storages: set) -> torch.Tensor:
    """t as safetensors writes it: on the CPU, contiguous, not sharing storage with another tensor of the shard.
    Copied only where one of these fails: a copy of every tensor would double the optimizer state's memory for the
    length of the save (2 x 78 MB for a reward model's embedding moments, gigabytes at 7B)."""
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous() or t.untyped_storage().data_ptr() in storages:
        t = t.to("cpu", copy=True).contiguous()
    storages.add(t.untyped_storage().data_ptr())
    return t


def save_state(folder: str | Path, obj: Any, name: str = "state", max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write `obj` as `<name>.json` + `<name>.safetensors` (or `<name>-00001-of-0000N.safetensors`) in `folder`.
    Tensors are copied to the CPU one shard at a time; CPU tensors are written in place (see `_writable`)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: list[torch.Tensor] = []
    tree = _encode(obj, tensors, name)
    shards, cur, size = [], [], 0
    for i, t in enumerate(tensors):
        n = t.numel() * t.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    shards.append(cur)
    files = [f"{name}.safetensors"] if len(shards) == 1 else \
        [f"{name}-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    where = {}
    for fname, idx in zip(files, shards):
        part, storages = {}, set()
        for i in idx:
            part[f"t{i}"] = _writable(tensors[i], storages)
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        where.update({f"t{i}": fname for i in idx})
        del part
    doc = {"format": "qwen-align state 1", "files": files, "tree": tree}
    (folder / f"{name}.json").write_text(json.dumps(doc, allow_nan=True) + "\n", encoding="utf-8")


def load_state(folder: str | Path, name: str = "state") -> Any:
    """Read what `save_state` wrote; JSON and safetensors parsers only. A missing, damaged or foreign file raises
    UnsafeStateError naming it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / f"{name}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnsafeStateError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsafeStateError(f"{path}: not a JSON state file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != "qwen-align state 1" or not isinstance(doc.get("files"), list):
        raise UnsafeStateError(f"{path}: not a qwen-align state file")
    tensors: dict[str, torch.Tensor] = {}
    for fname in doc["files"]:
        f = folder / str(fname)
        if Path(str(fname)).name != fname or not f.is_file():
            raise UnsafeStateError(f"{path}: names a tensor file {fname!r} that is not in {folder}")
        try:
            tensors |= load_file(str(f))
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise UnsafeStateError(f"{f}: not a readable safetensors file ({e})") from None
    try:
        return _decode(doc["tree"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise UnsafeStateError(f"{path}: damaged state tree ({e!r})") from None


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed's shard files (torch.save pickles written by its engine): weights_only loading with an allow-list.

def _deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19 puts in ZeRO-2/3 checkpoints of our trainers (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on saved shards). Anything else is refused."""
    import deepspeed.runtime.fp16.loss_scaler as ls
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    found = [ZeroStageEnum, fragment_address]
    found += [getattr(ls, n) for n in ("LossScaler", "DynamicLossScaler") if hasattr(ls, n)]
    return found


def safe_torch_load(path: str | Path, map_location=None) -> Any:
    """torch.load with weights_only=True plus the DeepSpeed allow-list. A file that needs any other global (a
    planted payload, say) raises UnsafeStateError before anything in it runs."""
    import pickle

    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeStateError(f"{path}: refused to load (only tensors and DeepSpeed's own state are read, never "
                               f"arbitrary pickled objects): {first}") from None


# ------------------------------------------------------------------------------------------- streamed weights
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class StreamedSafetensors:
    """Hugging Face weight files written one tensor at a time, for weights that arrive bucket by bucket (a ZeRO-3
    model gathered by common.gather.sharded_buckets): no dict of the whole model is ever held, and a tensor may be
    freed once `add` returns.

    The safetensors header must come first but lists every tensor's offsets, so each file reserves `header_bytes`
    up front (an upper bound from the names, see `header_bound`) and writes its header there at the end, padded with
    spaces (valid JSON; safetensors itself pads to 8 bytes). A file is closed when the next tensor would take it past
    `max_shard_bytes`; one file is `model.safetensors`, several are `model-0000k-of-0000N.safetensors` with
    `model.safetensors.index.json`, as model.checkpoint.write_weights and transformers name them."""

    def __init__(self, folder: str | Path, header_bytes: int, max_shard_bytes: int = 2 * 1024**3):
        self.folder, self.max_shard_bytes = Path(folder), max_shard_bytes
        self.header_bytes = -(-header_bytes // 8) * 8  # the data section starts 8-byte aligned
        self.files: list[tuple[Path, dict]] = []  # (part file, its header entries), closed ones
        self._f, self._entries, self._size = None, {}, 0

    @staticmethod
    def header_bound(names) -> int:
        """Bytes that surely hold the header of any subset of `names` (a generous 128 bytes per entry beyond the
        name: dtype, a shape of up to 4 dimensions and two 20-digit offsets take under 100)."""
        return 256 + sum(len(n) + 128 for n in names)

    def add(self, name: str, t: torch.Tensor) -> None:
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name")
        if name in self._entries or any(name in e for _, e in self.files):
            raise KeyError(f"{name}: written twice")
        n = t.numel() * t.element_size()
        if self._f is not None and self._size and self._size + n > self.max_shard_bytes:
            self._finish()
        if self._f is None:
            path = self.folder / f".part-{len(self.files):05d}"
            self._f = open(path, "wb")
            self._f.seek(8 + self.header_bytes)  # the header goes here at the end
            self._path, self._entries, self._size = path, {}, 0
        data = t.detach().contiguous().cpu().reshape(-1)
        if n:
            self._f.write(data.view(torch.uint8).numpy())  # the tensor's own bytes, no copy (little endian)
        self._entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [self._size, self._size + n]}
        self._size += n

    def _finish(self) -> None:
        head = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        if len(head) > self.header_bytes:
            raise ValueError(f"safetensors header of {len(head)} bytes exceeds the {self.header_bytes} reserved")
        self._f.seek(0)
        self._f.write(len(head.ljust(self.header_bytes)).to_bytes(8, "little") + head.ljust(self.header_bytes))
        self._f.close()
        self.files.append((self._path, self._entries))
        self._f = None

    def close(self) -> list[str]:
        """Finish the last file and give every file its final name; returns the file names."""
        if self._f is not None:
            self._finish()
        if not self.files:
            raise ValueError(f"{self.folder}: no tensors were written")
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for (part, _), name in zip(self.files, names):
            part.replace(self.folder / name)
        if n > 1:
            weight_map = {t: name for (_, entries), name in zip(self.files, names) for t in entries}
            total = sum(e["data_offsets"][1] - e["data_offsets"][0] for _, es in self.files for e in es.values())
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        return names
