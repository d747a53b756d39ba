"""Deterministic BitTorrent v1 metadata for one file of a (repo, commit), and the checks a leecher runs.

The unit is one file, not the model: a v1 info-hash covers the piece hashes, so a torrent exists only once
every byte of it is held. Per file, a slot holder shares each file as soon as it has landed and passed
its digest, and the swarm follows one file behind the origin fill instead of one whole model behind
(``file_torrents``; ``stripe`` splits the origin reads among the slot holders).

Every node must reach the same info-hash on its own, so nothing in the info dict depends on who built
it or when: files sorted by path (UTF-8 bytes), names = paths inside the snapshot, a piece size fixed
by the total size, and only the four keys ``files``, ``name``, ``piece length``, ``pieces`` (no
creator, no date, no ``private``). The piece hashes come from the file bytes, so only a node that holds
every byte can build the info dict; a node without them gets it from a peer and :func:`check_info`
re-derives everything except the piece hashes from its trusted plan and demands an exact match. The
plan's digests (Hub sha256 / git-sha1, PVC blob names), not the torrent, stay the reference: piece
hashes only reject bad pieces early and get the peer that sent them banned.

    plan (trusted: path, size, digest) --plan_key()--> 64-hex key        peers look torrents up by it
                                       --layout()----> TorrentLayout     name, piece size, file list
    layout + piece hashes (from bytes) --build_info()--> bencoded info dict --info_hash()--> 40 hex

Pure: hashlib only; no I/O, no libtorrent.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from agent.core.plan import FileEntry

SCHEME = 2  # bump when anything below changes: every info-hash in the cluster changes with it
MiB = 1024 * 1024
PIECE_MIN = 1 * MiB
PIECE_MAX = 16 * MiB
TARGET_PIECES = 2048  # pieces for a model of PIECE_MIN * TARGET_PIECES bytes and up, until PIECE_MAX caps it
SHA1_LEN = 20
E = TypeVar("E", bound=FileEntry)


class TorrentError(ValueError):
    """Metadata that does not decode, or does not match the trusted plan; the message says which field."""


# -- bencode: the canonical encoding (sorted keys, no leading zeros), so encode(decode(b)) == b ---------

Bencodable = int | bytes | str | list["Bencodable"] | dict[bytes | str, "Bencodable"]


def bencode(value: Bencodable) -> bytes:
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _encode(v: Bencodable, out: list[bytes]) -> None:
    if isinstance(v, bool):
        raise TypeError("bencode: bool is not a bencode type")
    if isinstance(v, int):
        out.append(b"i%de" % v)
    elif isinstance(v, bytes | str):
        b = v.encode() if isinstance(v, str) else v
        out.append(b"%d:" % len(b))
        out.append(b)
    elif isinstance(v, list):
        out.append(b"l")
        for item in v:
            _encode(item, out)
        out.append(b"e")
    elif isinstance(v, dict):
        keys = {(k.encode() if isinstance(k, str) else k): k for k in v}
        out.append(b"d")
        for kb in sorted(keys):
            out.append(b"%d:" % len(kb))
            out.append(kb)
            _encode(v[keys[kb]], out)
        out.append(b"e")
    else:
        raise TypeError(f"bencode: cannot encode {type(v).__name__}")


def bdecode(data: bytes) -> Bencodable:
    """Decode one value; strings stay bytes, dict keys are bytes. Rejects non-canonical input."""
    try:
        value, end = _decode(data, 0, 0)
    except (IndexError, ValueError) as e:
        raise TorrentError(f"not bencoded data: {e}") from None
    if end != len(data):
        raise TorrentError(f"not bencoded data: {len(data) - end} trailing bytes")
    return value


def _decode(d: bytes, i: int, depth: int) -> tuple[Bencodable, int]:
    if depth > 32:
        raise ValueError("nested too deep")
    c = d[i:i + 1]
    if c == b"i":
        end = d.index(b"e", i)
        digits = d[i + 1:end]
        if not digits or digits == b"-0" or (digits.lstrip(b"-").startswith(b"0") and digits not in (b"0",)):
            raise ValueError(f"bad integer {digits!r} at {i}")
        return int(digits), end + 1
    if c == b"l":
        items: list[Bencodable] = []
        i += 1
        while d[i:i + 1] != b"e":
            item, i = _decode(d, i, depth + 1)
            items.append(item)
        return items, i + 1
    if c == b"d":
        out: dict[bytes | str, Bencodable] = {}
        last: bytes | None = None
        i += 1
        while d[i:i + 1] != b"e":
            key, i = _decode(d, i, depth + 1)
            if not isinstance(key, bytes):
                raise ValueError(f"dict key is not a string at {i}")
            if last is not None and key <= last:
                raise ValueError(f"dict keys not sorted or repeated at {key!r}")
            last = key
            out[key], i = _decode(d, i, depth + 1)
        return out, i + 1
    if c.isdigit():
        colon = d.index(b":", i)
        n_text = d[i:colon]
        if n_text != b"0" and n_text.startswith(b"0"):
            raise ValueError(f"bad string length {n_text!r} at {i}")
        n = int(n_text)
        start = colon + 1
        if start + n > len(d):
            raise ValueError(f"string of {n} bytes runs past the end at {i}")
        return d[start:start + n], start + n
    raise ValueError(f"unexpected byte {c!r} at {i}")


# -- the layout every node derives from the trusted plan -----------------------------------------------


@dataclass(frozen=True)
class TorrentFile:
    path: str
    size: int


@dataclass(frozen=True)
class TorrentLayout:
    """Everything in the info dict except the piece hashes; a pure function of (repo, commit, files)."""

    name: str
    piece_length: int
    files: tuple[TorrentFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def num_pieces(self) -> int:
        return -(-self.total_bytes // self.piece_length)

    def file_spans(self) -> list[tuple[int, int]]:
        """(first byte, end byte) of each file in the concatenated torrent stream."""
        spans, pos = [], 0
        for f in self.files:
            spans.append((pos, pos + f.size))
            pos += f.size
        return spans


def piece_length_for(total_bytes: int) -> int:
    """Smallest power of two giving at most TARGET_PIECES pieces, within [PIECE_MIN, PIECE_MAX].

    1 GiB -> 1 MiB (1024 pieces), 2 GiB -> 1 MiB, 8 GiB -> 4 MiB, 140 GB -> 16 MiB (8345 pieces, a
    167 KB ``pieces`` string). Small pieces let a swarm start sharing sooner; large ones keep the
    metadata and libtorrent's per-piece bookkeeping small for big models.
    """
    n = PIECE_MIN
    while n < PIECE_MAX and n * TARGET_PIECES < total_bytes:
        n *= 2
    return n


def torrent_name(repo: str, commit: str) -> str:
    """One path component naming the snapshot; it puts repo and commit inside the info-hash."""
    return f"models--{repo.replace('/', '--')}--{commit}"


def layout(repo: str, commit: str, files: Iterable[FileEntry | TorrentFile]) -> TorrentLayout:
    """The deterministic layout: files sorted by path bytes; empty files left out (nothing to share)."""
    chosen = sorted((TorrentFile(f.path, f.size) for f in files if f.size > 0), key=lambda f: f.path.encode())
    for a, b in itertools.pairwise(chosen):
        if a.path == b.path:
            raise TorrentError(f"path {a.path!r} appears twice")
    total = sum(f.size for f in chosen)
    return TorrentLayout(torrent_name(repo, commit), piece_length_for(total), tuple(chosen))


def plan_key(repo: str, commit: str, files: Sequence[FileEntry]) -> str:
    """Index key of a (repo, commit, file set) with its trusted digests: what peers look torrents up by.

    Every file needs a trusted digest: a key over unknown content could name two different torrents.
    """
    rows = []
    for f in sorted(files, key=lambda f: f.path.encode()):
        if f.digest is None:
            raise TorrentError(f"{f.path}: no trusted digest; peer bytes need a reference to be checked against")
        rows.append([f.path, f.size, f.algo, f.digest])
    doc = json.dumps({"scheme": SCHEME, "repo": repo, "commit": commit, "files": rows},
                     separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(doc.encode()).hexdigest()


def build_info(lay: TorrentLayout, pieces: bytes) -> bytes:
    """The bencoded info dict for ``lay`` with ``pieces`` (concatenated SHA-1 of each piece)."""
    if len(pieces) != SHA1_LEN * lay.num_pieces:
        raise TorrentError(f"pieces: {len(pieces)} bytes, expected {SHA1_LEN * lay.num_pieces}")
    if not lay.files:
        raise TorrentError("files: a torrent needs at least one non-empty file")
    info: dict[bytes | str, Bencodable] = {
        "files": [{"length": f.size, "path": list(f.path.split("/"))} for f in lay.files],  # type: ignore[dict-item]
        "name": lay.name,
        "piece length": lay.piece_length,
        "pieces": pieces,
    }
    return bencode(info)


def info_hash(info: bytes) -> str:
    """The v1 info-hash (hex SHA-1 of the bencoded info dict)."""
    return hashlib.sha1(info).hexdigest()


def check_info(info: bytes, expected: TorrentLayout) -> str:
    """Accept an info dict from a peer only if it is exactly ``expected`` plus piece hashes.

    Returns the info-hash. Any other key, another name, piece size, file order, path or length is a
    TorrentError naming the field: such a torrent belongs to another commit or file set and is never
    mixed into this fill.
    """
    d = bdecode(info)
    if not isinstance(d, dict):
        raise TorrentError("info: not a dictionary")
    keys = sorted(k.decode(errors="replace") for k in d if isinstance(k, bytes))
    if keys != ["files", "name", "piece length", "pieces"]:
        raise TorrentError(f"info: keys {keys}, expected files, name, piece length, pieces")
    if d[b"name"] != expected.name.encode():
        raise TorrentError(f"name: {d[b'name']!r}, expected {expected.name!r}")
    if d[b"piece length"] != expected.piece_length:
        raise TorrentError(f"piece length: {d[b'piece length']!r}, expected {expected.piece_length}")
    files = d[b"files"]
    if not isinstance(files, list) or len(files) != len(expected.files):
        got = len(files) if isinstance(files, list) else "?"
        raise TorrentError(f"files: {got} entries, expected {len(expected.files)}")
    for i, (got, want) in enumerate(zip(files, expected.files, strict=True)):
        want_entry = {b"length": want.size, b"path": [p.encode() for p in want.path.split("/")]}
        if got != want_entry:
            raise TorrentError(f"files[{i}]: {got!r}, expected {want.path} ({want.size} bytes)")
    pieces = d[b"pieces"]
    if not isinstance(pieces, bytes) or len(pieces) != SHA1_LEN * expected.num_pieces:
        n = len(pieces) if isinstance(pieces, bytes) else "?"
        raise TorrentError(f"pieces: {n} bytes, expected {SHA1_LEN * expected.num_pieces}")
    if build_info(expected, pieces) != info:  # canonical encoding: nothing else can hide in the bytes
        raise TorrentError("info: not in canonical form")
    return info_hash(info)


def piece_hashes(chunks: Iterable[bytes | memoryview], piece_length: int) -> bytes:
    """SHA-1 of each piece of a byte stream given as chunks of any size (the concatenated files)."""
    out: list[bytes] = []
    h = hashlib.sha1()
    filled = 0
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            take = min(len(view), piece_length - filled)
            h.update(view[:take])
            filled += take
            view = view[take:]
            if filled == piece_length:
                out.append(h.digest())
                h, filled = hashlib.sha1(), 0
    if filled:
        out.append(h.digest())
    return b"".join(out)


def piece_priorities(lay: TorrentLayout, wanted: set[str], *, share: tuple[int, int] | None = None) -> list[int]:
    """libtorrent piece priorities (0 skip, 1..7) for downloading the ``wanted`` files of ``lay``.

    - ``share=(j, k)``, in a swarm of ``k`` known nodes of which this is number ``j``: pieces ``p`` with
      ``p % k == j`` first (7), the rest after (1). Leechers then ask a seed for different pieces and fetch
      the rest from each other; without it they asked the one seed for the same rare pieces and it sent
      the model about 1.5 times (bench/swarm_lab.py).
    - otherwise (one source): seven bands by position, earlier bytes first, so files complete one band
      after another and are hashed while later ones arrive instead of all at the end.
    A piece that touches a wanted file is wanted.
    """
    spans = [(a, b) for (a, b), f in zip(lay.file_spans(), lay.files, strict=True) if f.path in wanted and b > a]
    total = lay.total_bytes
    out: list[int] = []
    fi = 0
    for p in range(lay.num_pieces):
        lo, hi = p * lay.piece_length, min(total, (p + 1) * lay.piece_length)
        while fi < len(spans) and spans[fi][1] <= lo:
            fi += 1
        if fi >= len(spans) or spans[fi][0] >= hi:
            out.append(0)
        elif share is not None:
            out.append(7 if p % share[1] == share[0] else 1)
        else:
            out.append(7 - 6 * lo // max(1, total))
    return out


# -- one torrent per file -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileTorrent:
    """One file's torrent as every node derives it from the trusted plan (piece hashes excluded)."""

    entry: FileEntry
    key: str  # index key: plan_key over this one file
    layout: TorrentLayout


def file_torrents(repo: str, commit: str, files: Sequence[FileEntry]) -> tuple[FileTorrent, ...]:
    """A torrent per non-empty file, sorted by path bytes. Raises TorrentError (untrusted digest, duplicate)."""
    chosen = sorted((f for f in files if f.size > 0), key=lambda f: f.path.encode())
    for a, b in itertools.pairwise(chosen):
        if a.path == b.path:
            raise TorrentError(f"path {a.path!r} appears twice")
    return tuple(FileTorrent(f, plan_key(repo, commit, [f]), layout(repo, commit, [f])) for f in chosen)


def commit_key(repo: str, commit: str) -> str:
    """Index key of a snapshot: a node lists under it the file keys it serves for that (repo, commit)."""
    return hashlib.sha256(f"{SCHEME}\0{repo}@{commit}".encode()).hexdigest()


def stripe(entries: Sequence[E], j: int, k: int) -> tuple[list[E], list[E]]:
    """Holder ``j`` of ``k``: its own share of ``entries`` (in the given order), then the others', rotated.

    Shares are contiguous and balanced by bytes: an entry belongs to the holder in whose ``1/k`` of the
    total its middle byte lies, so a 140 GB model of 5 GB shards splits evenly and a model of two shards
    and ten small files gives each of two holders one shard. Holders read their own shares from the
    origin at once: the whole model is in the cluster after about ``1/k`` of a fill, and each takes the
    rest from the others (or from the origin when nobody has it).
    """
    if k <= 1 or not entries:
        return list(entries), []
    j %= k
    total = sum(e.size for e in entries) or 1
    owner, pos = [], 0
    for e in entries:
        owner.append(min(k - 1, (2 * pos + e.size) * k // (2 * total)))
        pos += e.size
    own = [e for e, o in zip(entries, owner, strict=True) if o == j]
    after = [e for e, o in zip(entries, owner, strict=True) if o > j]
    before = [e for e, o in zip(entries, owner, strict=True) if o < j]
    return own, after + before


SMALL_FILE = 16 * MiB  # smaller files go to the origin together: their cost is requests, not bytes


def share_batches(entries: Sequence[E]) -> list[list[E]]:
    """A slot holder's origin reads, in order: each big file alone, runs of small files together.

    Four 5 GB shards fetched at once would all land (and be shared) at the end of four files' time; one at
    a time, the first is shared after one file's time, and the origin link is as busy either way.
    """
    out: list[list[E]] = []
    for e in entries:
        if e.size < SMALL_FILE and out and out[-1][-1].size < SMALL_FILE:
            out[-1].append(e)
        else:
            out.append([e])
    return out
