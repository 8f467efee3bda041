"""Exact and near-duplicate search: MinHash signatures with LSH banding over ALL fields of a record.

A record is a list of text fields (a pair: prompt, chosen, rejected). It nearly duplicates an earlier kept record
when EVERY field has estimated Jaccard similarity >= threshold (so two pairs that share a long prompt or system
message but differ in their replies are both kept). Candidates come from LSH banding in which each band key takes
the same `rows` signature positions of every field: two records share a band only if all their fields agree there,
so records that share one field (thousands of pairs under one system prompt) do not all land in one bucket. The
expected work is O(n) (each record is compared with the few records it shares a band with), instead of comparing
every record with every earlier one that shares the first field.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata

import numpy as np
from tqdm import tqdm

_PROGRESS_MIN = 5000  # records; below this a progress bar is noise
_M64 = np.uint64(0x9E3779B97F4A7C15)
_MARGIN = 0.15  # candidates whose MinHash estimate is this far below the threshold are not checked exactly
_CHUNK = 2048  # shingles per MinHash block: (num_perm, _CHUNK) uint64 = 2 MiB, whatever the text length


_WS = re.compile(r"\s+")


def normalize_key(text: str) -> str:
    """Comparison key: NFKC (full-width -> ASCII forms, compatibility characters), casefold, whitespace collapsed.

    Used for dedupe and decontamination only: written text keeps its full-width Chinese punctuation, which NFKC
    would turn into ASCII ("，" -> ",") and so change the style of Traditional / Simplified Chinese replies.
    """
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads rolling-hash values over all 64 bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (C,)


def _shingles(cps: np.ndarray, start: int, stop: int, k: int) -> np.ndarray:
    """64-bit hashes of the k-shingles starting at positions start..stop-1  # (stop - start,)"""
    h = np.zeros(stop - start, dtype=np.uint64)
    for j in range(k):  # polynomial rolling hash, wrapping mod 2^64
        h = h * _M64 + cps[start + j:stop + j].astype(np.uint64)
    return _mix64(h)


def shingle_hashes(text: str, k: int = 5) -> np.ndarray:
    """Distinct 64-bit hashes of the character k-shingles of `text`  # (S,)

    Characters, not words, so Chinese needs no segmentation; a text shorter than k is one shingle.
    """
    cps = _codepoints(text)
    if len(cps) == 0:
        return np.zeros(1, dtype=np.uint64)
    k = min(k, len(cps))
    return np.unique(_shingles(cps, 0, len(cps) - k + 1, k))


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd: a bijection mod 2^64
    return a, rng.integers(0, 2**63, num_perm, dtype=np.uint64)


_BUFFERS: dict[int, np.ndarray] = {}  # num_perm -> (num_perm, _CHUNK) scratch: reused, so no page faults per call


def minhash(text: str, num_perm: int = 128, k: int = 5, seed: int = 0) -> np.ndarray:
    """MinHash signature of the normalised text  # (num_perm,)

    Permutation i is x -> a_i * x + b_i mod 2^64 with odd a_i (a bijection); P(sig_a[i] == sig_b[i]) estimates the
    Jaccard similarity of the two shingle sets (Broder 1997). The minimum over repeated shingles is the minimum over
    the set, so the shingles are streamed in blocks of _CHUNK through one reused buffer: memory stays a few MiB for
    a 3-million-character text, and short texts allocate nothing large.
    """
    a, b = _permutations(num_perm, seed)  # (num_perm,) each
    cps = _codepoints(normalize_key(text))
    if len(cps) == 0:
        return b.copy()  # the one shingle of the empty text hashes to 0: a * 0 + b
    k = min(k, len(cps))
    n = len(cps) - k + 1
    buf = _BUFFERS.get(num_perm)
    if buf is None:
        buf = _BUFFERS[num_perm] = np.empty((num_perm, _CHUNK), dtype=np.uint64)
    sig = np.full(num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
    for start in range(0, n, _CHUNK):
        h = _shingles(cps, start, min(n, start + _CHUNK), k)  # (S,)
        view = buf[:, :len(h)]  # (num_perm, S)
        np.multiply(a[:, None], h[None, :], out=view)
        np.add(view, b[:, None], out=view)
        np.minimum(sig, view.min(axis=1), out=sig)
    return sig


_BATCH_CHARS = 2**20  # characters per minhash_many pass; longer texts are streamed one by one


def minhash_many(texts: list[str], num_perm: int = 128, k: int = 5, seed: int = 0) -> np.ndarray:
    """minhash() of each text  # (N, num_perm), equal to [minhash(t) for t in texts]

    Many short texts at once: one rolling-hash pass over their concatenated code points (windows that cross from
    one text into the next are left out), then the permutations block by block with a per-text minimum
    (np.minimum.reduceat). This removes the per-call overhead that dominates for chat-length texts.
    """
    a, b = _permutations(num_perm, seed)
    out = np.empty((len(texts), num_perm), dtype=np.uint64)
    keys = [normalize_key(t) for t in texts]
    batch: list[int] = []
    size = 0
    for i, key in enumerate(keys):
        if len(key) < k or len(key) > _BATCH_CHARS:
            out[i] = minhash(texts[i], num_perm, k, seed)  # empty, shorter than k, or huge: one by one
            continue
        batch.append(i)
        size += len(key)
        if size >= _BATCH_CHARS:
            _minhash_batch([keys[j] for j in batch], a, b, k, out, batch)
            batch, size = [], 0
    if batch:
        _minhash_batch([keys[j] for j in batch], a, b, k, out, batch)
    return out


def _minhash_batch(keys: list[str], a: np.ndarray, b: np.ndarray, k: int, out: np.ndarray, rows: list[int]) -> None:
    """Signatures of texts that each have >= k characters, into out[rows]."""
    lengths = np.array([len(t) for t in keys])  # (N,)
    cps = _codepoints("".join(keys))  # (C,)
    h = _shingles(cps, 0, len(cps) - k + 1, k)  # (C - k + 1,) every window, also those across two texts
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))  # (N,)
    counts = lengths - k + 1  # (N,) windows inside each text
    owner = np.repeat(np.arange(len(keys)), counts)  # (S,)
    pos = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(starts, counts)
    h = h[pos]  # (S,) only windows inside one text
    sig = np.full((len(keys), len(a)), np.iinfo(np.uint64).max, dtype=np.uint64)  # (N, num_perm)
    buf = _BUFFERS.get(len(a))
    if buf is None:
        buf = _BUFFERS[len(a)] = np.empty((len(a), _CHUNK), dtype=np.uint64)
    for lo in range(0, len(h), _CHUNK):
        hi = min(len(h), lo + _CHUNK)
        view = buf[:, :hi - lo]  # (num_perm, S')
        np.multiply(a[:, None], h[None, lo:hi], out=view)
        np.add(view, b[:, None], out=view)
        seg = np.flatnonzero(np.diff(owner[lo:hi])) + 1
        seg = np.concatenate(([0], seg))  # first column of each text's run in this block
        who = owner[lo:hi][seg]  # (runs,) distinct texts
        sig[who] = np.minimum(sig[who], np.minimum.reduceat(view, seg, axis=1).T)
    out[rows] = sig


def lsh_params(threshold: float, num_perm: int, recall: float = 0.99, fields: int = 1) -> tuple[int, int]:
    """(bands, rows) for LSH banding: the fewest false candidates among settings that make a record pair whose
    `fields` fields all have Jaccard == threshold a candidate with probability >= recall.

    A band holds `rows` positions of each field's signature, so such a pair shares one band with probability
    threshold^(rows * fields), and some band with probability 1 - (1 - threshold^(rows * fields))^bands (Leskovec
    et al., Mining of Massive Datasets, sec. 3.4); candidates are verified on the full signatures, so recall is what
    matters. A pair more similar than the threshold in any field is found with higher probability.
    """
    s = np.linspace(0.0, threshold, 1001)
    best = None
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** (rows * fields)) ** bands < recall:
            continue
        false_mass = np.trapezoid(1 - (1 - s ** (rows * fields)) ** bands, s)
        if best is None or false_mass < best[0]:
            best = (false_mass, bands, rows)
    if best is None:
        raise ValueError(f"no LSH banding of {num_perm} permutations reaches recall {recall} at {threshold}")
    return best[1], best[2]


def near_duplicate_of(fields: list[list[str]], threshold: float = 0.9, num_perm: int = 128,
                      k: int = 5) -> list[int | None]:
    """For each record (a list of text fields), the index of an earlier kept record it nearly duplicates, else None.

    Near duplicate = same number of fields and every field has Jaccard >= threshold (module docstring). LSH finds
    the candidates; each candidate whose MinHash estimate is within _MARGIN of the threshold is then checked on the
    exact shingle sets, so the estimate's noise (std ~0.02 at 0.93 with 128 permutations) decides nothing.
    """
    out: list[int | None] = []
    params = {}
    buckets: dict[tuple[int, int], dict[int, list[int]]] = {}  # (n fields, band) -> band key -> kept records
    sigs: dict[int, np.ndarray] = {}  # kept record -> (F, num_perm) uint32 (the low 32 bits suffice to compare)
    mixers = np.random.default_rng(1).integers(1, 2**63, (8, num_perm), dtype=np.uint64) * np.uint64(2) + 1
    bar = tqdm(total=len(fields), desc="near-duplicates", disable=len(fields) < _PROGRESS_MIN, file=sys.stderr)
    for lo in range(0, len(fields), 1024):  # signatures 1024 records at a time: bounded memory
        chunk = fields[lo:lo + 1024]
        flat = minhash_many([t for rec in chunk for t in rec], num_perm, k)  # (sum F, num_perm)
        ends = np.cumsum([len(rec) for rec in chunk])
        for i, rec_sig in enumerate(np.split(flat, ends[:-1]), start=lo):
            f = len(rec_sig)
            if f not in params:
                params[f] = lsh_params(threshold, num_perm, fields=f)
            bands, rows = params[f]
            # one 64-bit key per band from its rows of every field (wrapping multiply-add with odd constants)
            mix = (rec_sig[:, :bands * rows] * mixers[np.arange(f) % 8, :bands * rows]).reshape(f, bands, rows)
            keys = mix.sum(axis=(0, 2), dtype=np.uint64).tolist()  # (bands,)
            low = rec_sig.astype(np.uint32)
            cands = sorted({c for j, key in enumerate(keys) for c in buckets.get((f, j), {}).get(key, ())})
            dup = next((c for c in cands if (sigs[c] == low).mean(axis=1).min() >= threshold - _MARGIN
                        and _similar(fields[c], fields[i], threshold, k)), None)
            out.append(dup)
            if dup is None:
                sigs[i] = low
                for j, key in enumerate(keys):
                    buckets.setdefault((f, j), {}).setdefault(key, []).append(i)
        bar.update(len(chunk))
    bar.close()
    return out


def jaccard(a: str, b: str, k: int = 5) -> float:
    """Exact Jaccard similarity of the k-shingle sets of the normalised texts."""
    x, y = shingle_hashes(normalize_key(a), k), shingle_hashes(normalize_key(b), k)
    common = len(np.intersect1d(x, y, assume_unique=True))
    return common / (len(x) + len(y) - common)


def _similar(a: list[str], b: list[str], threshold: float, k: int) -> bool:
    """Every field's exact Jaccard >= threshold (the candidates' check: no estimation noise)."""
    return all(jaccard(x, y, k) >= threshold for x, y in zip(a, b))


def exact_duplicate_of(keys: list[str]) -> list[int | None]:
    """For each key, the index of its first occurrence if it is a repeat, else None."""
    first: dict[str, int] = {}
    out = []
    for i, key in enumerate(keys):
        out.append(first.get(key))
        first.setdefault(key, i)
    return out
