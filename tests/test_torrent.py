"""Deterministic torrents (agent/core/torrent.py): canonical bencode, a pinned info-hash, and the checks
that keep a peer's info dict for another commit or file set out of a fill."""

from __future__ import annotations

import hashlib

import pytest

from agent.core import torrent as T
from agent.core.plan import FileEntry

REPO = "org/golden"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = {
    "tok/tokenizer.json": b"x" * 1000,
    "model.safetensors": bytes(range(256)) * 8192 + b"tail",  # 2 MiB + 4: three 1 MiB pieces in all
    "config.json": b'{"a": 1}\n',
}


def entries(files: dict[str, bytes] = FILES) -> list[FileEntry]:
    return [FileEntry(p, len(d), "sha256", hashlib.sha256(d).hexdigest()) for p, d in files.items()]


def info_for(repo: str = REPO, commit: str = COMMIT, files: dict[str, bytes] = FILES) -> tuple[bytes, T.TorrentLayout]:
    lay = T.layout(repo, commit, entries(files))
    return T.build_info(lay, T.piece_hashes((files[f.path] for f in lay.files), lay.piece_length)), lay


def test_golden_info_hash_and_plan_key() -> None:
    """Pinned: a change here changes every info-hash in every cluster, so it must come with a SCHEME bump."""
    info, lay = info_for()
    assert [f.path for f in lay.files] == ["config.json", "model.safetensors", "tok/tokenizer.json"]
    assert (lay.piece_length, lay.num_pieces, lay.name) == (T.MiB, 3, f"models--org--golden--{COMMIT}")
    assert T.info_hash(info) == "6884aceeefb326558e283d809cd5b194052fc25a"
    assert T.plan_key(REPO, COMMIT, entries()) == "bab9b7cbed6ae9d9d9b4f2458652581ef8d445132daa1ba3f3a048caefdcba21"


def test_golden_file_torrents_and_commit_key() -> None:
    """The unit peers share: one torrent per file, each with its own key and info-hash (pinned)."""
    fts = T.file_torrents(REPO, COMMIT, entries())
    got = [(ft.entry.path, ft.key[:16], T.info_hash(T.build_info(ft.layout, T.piece_hashes([FILES[ft.entry.path]],
                                                                                           ft.layout.piece_length))))
           for ft in fts]
    assert got == [
        ("config.json", "bd38882adb1a18b9", "860e0069ac5b24462479d43fc96da884c0b3cc69"),
        ("model.safetensors", "5a85563c41ec3d0f", "4e70b31d97c212a815b4a4357165f117ebd44039"),
        ("tok/tokenizer.json", "a660dc973f2b8f52", "f33767b9f8374d4dc83e4e8a7dfb17bad68a1b4e"),
    ]
    assert [ft.layout.num_pieces for ft in fts] == [1, 3, 1]
    assert all(ft.key == T.plan_key(REPO, COMMIT, [ft.entry]) for ft in fts)
    assert T.commit_key(REPO, COMMIT) == "c3c0dd535f833c2e989814aab2123efc6850323775cee282b625651be354daa2"
    assert T.commit_key(REPO, "f" * 40) != T.commit_key(REPO, COMMIT)
    with pytest.raises(T.TorrentError, match="no trusted digest"):
        T.file_torrents(REPO, COMMIT, [FileEntry("a.bin", 5, "sha256", None)])


def sized(*sizes: int) -> list[FileEntry]:
    return [FileEntry(f"f{i}", n, "sha256", f"{i:064x}") for i, n in enumerate(sizes)]


@pytest.mark.parametrize(("sizes", "k", "owners"), [
    ((5, 5, 5, 5), 2, [[0, 1], [2, 3]]),  # equal shards: halves
    ((1, 1, 1, 100, 1, 100, 1), 2, [[0, 1, 2, 3], [4, 5, 6]]),  # by bytes (103 | 102), not count
    ((10, 10, 10), 4, [[0], [], [1], [2]]),  # more holders than files: a holder may own nothing
    ((7,), 2, [[], [0]]),
    ((1, 1, 1, 50, 50, 1, 1), 2, [[0, 1, 2, 3], [4, 5, 6]]),  # two shards after small files: one each
    ((3, 3, 3), 1, [[0, 1, 2]]),
])
def test_stripe_splits_by_bytes_and_covers_every_file_once(sizes: tuple[int, ...], k: int,
                                                           owners: list[list[int]]) -> None:
    es = sized(*sizes)
    for j in range(k):
        own, rest = T.stripe(es, j, k)
        assert [es.index(e) for e in own] == owners[j]
        assert sorted(es.index(e) for e in own + rest) == list(range(len(es)))  # each file exactly once
        later = [i for o in owners[j + 1:] for i in o]
        assert [es.index(e) for e in rest][:len(later)] == later  # the next holders' files first, then wrap


def test_input_order_does_not_matter() -> None:
    reordered = dict(reversed(list(FILES.items())))
    assert info_for(files=reordered)[0] == info_for()[0]
    assert T.plan_key(REPO, COMMIT, entries(reordered)) == T.plan_key(REPO, COMMIT, entries())


def test_other_commit_file_set_or_bytes_give_other_hashes() -> None:
    base = T.info_hash(info_for()[0])
    other_commit = "f" * 40
    assert T.info_hash(info_for(commit=other_commit)[0]) != base  # identical bytes, other commit
    assert T.info_hash(info_for(repo="org/other")[0]) != base
    subset = {k: v for k, v in FILES.items() if k != "config.json"}
    assert T.info_hash(info_for(files=subset)[0]) != base
    changed = {**FILES, "config.json": b'{"a": 2}\n'}
    assert T.info_hash(info_for(files=changed)[0]) != base
    keys = {T.plan_key(REPO, c, entries(f)) for c, f in [(COMMIT, FILES), (other_commit, FILES), (COMMIT, subset),
                                                           (COMMIT, changed)]}
    assert len(keys) == 4


def test_empty_files_are_left_out_and_duplicates_refused() -> None:
    lay = T.layout(REPO, COMMIT, [*entries(), FileEntry("empty.txt", 0, "git-sha1", "e69de29b" + "0" * 32)])
    assert "empty.txt" not in [f.path for f in lay.files]
    with pytest.raises(T.TorrentError, match="appears twice"):
        T.layout(REPO, COMMIT, [*entries(), entries()[0]])


def test_plan_key_needs_trusted_digests() -> None:
    with pytest.raises(T.TorrentError, match=r"config\.json: no trusted digest"):
        T.plan_key(REPO, COMMIT, [FileEntry("config.json", 9, "git-sha1", None)])


@pytest.mark.parametrize(("total", "piece"), [
    (0, T.MiB), (5 * T.MiB, T.MiB), (2 << 30, T.MiB), ((2 << 30) + 1, 2 * T.MiB), (8 << 30, 4 * T.MiB),
    (140 * 10**9, 16 * T.MiB), (10**13, 16 * T.MiB),
])
def test_piece_length_rule(total: int, piece: int) -> None:
    assert T.piece_length_for(total) == piece


def test_piece_hashes_do_not_depend_on_chunking() -> None:
    data = bytes(range(256)) * 20000
    one = T.piece_hashes([data], 65536)
    many = T.piece_hashes([data[i:i + 1000] for i in range(0, len(data), 1000)], 65536)
    assert one == many and len(one) == 20 * -(-len(data) // 65536)
    assert one[:20] == hashlib.sha1(data[:65536]).digest()


def test_check_info_accepts_exact_match_only() -> None:
    info, lay = info_for()
    assert T.check_info(info, lay) == T.info_hash(info)
    _, other_commit = info_for(commit="f" * 40)
    with pytest.raises(T.TorrentError, match=r"^name: "):
        T.check_info(info, other_commit)
    _, subset = info_for(files={k: v for k, v in FILES.items() if k != "config.json"})
    with pytest.raises(T.TorrentError, match=r"^files: 3 entries, expected 2"):
        T.check_info(info, subset)
    _, resized = info_for(files={**FILES, "config.json": b'{"a": 10}\n'})
    with pytest.raises(T.TorrentError, match=r"^files\[0\]: .*expected config.json \(10 bytes\)"):
        T.check_info(info, resized)


def _tampered(**changes: object) -> bytes:
    info, _ = info_for()
    d = T.bdecode(info)
    assert isinstance(d, dict)
    for k, v in changes.items():
        if v is None:
            del d[k.replace("_", " ").encode()]
        else:
            d[k.replace("_", " ").encode()] = v  # type: ignore[assignment]
    return T.bencode(d)  # type: ignore[arg-type]


@pytest.mark.parametrize(("changes", "error"), [
    ({"private": 1}, "^info: keys"),
    ({"created_by": "someone"}, "^info: keys"),
    ({"piece_length": 2 * T.MiB}, "^piece length: "),
    ({"pieces": b"\0" * 40}, "^pieces: 40 bytes, expected 60"),
    ({"files": None}, "^info: keys"),
])
def test_check_info_rejects_tampered_dicts(changes: dict[str, object], error: str) -> None:
    with pytest.raises(T.TorrentError, match=error):
        T.check_info(_tampered(**changes), info_for()[1])


def test_reordered_files_rejected() -> None:
    info, lay = info_for()
    d = T.bdecode(info)
    assert isinstance(d, dict) and isinstance(d[b"files"], list)
    d[b"files"] = list(reversed(d[b"files"]))
    with pytest.raises(T.TorrentError, match=r"^files\[0\]"):
        T.check_info(T.bencode(d), lay)


def test_bencode_roundtrip_and_canonical_decoding() -> None:
    value = {"b": [1, -2, b"x"], "a": {"c": b""}, "z": 0}
    enc = T.bencode(value)  # type: ignore[arg-type]
    assert enc == b"d1:ad1:c0:e1:bli1ei-2e1:xe1:zi0ee"
    assert T.bencode(T.bdecode(enc)) == enc
    for bad in (b"i01e", b"i-0e", b"03:abc", b"d1:bi1e1:ai2ee", b"d1:ai1e1:ai2ee", b"5:abc", b"i1ei2e", b"x",
                b"l" * 40 + b"e" * 40, b"di1ei2ee"):
        with pytest.raises(T.TorrentError):
            T.bdecode(bad)
    with pytest.raises(TypeError):
        T.bencode(True)  # type: ignore[arg-type]


def test_piece_priorities_bands_and_shares() -> None:
    files = {"a.bin": b"a" * (3 * T.MiB), "b.bin": b"b" * (T.MiB // 2), "c.bin": b"c" * (2 * T.MiB)}
    lay = T.layout(REPO, COMMIT, entries(files))
    assert lay.num_pieces == 6  # a: 0-2, b: 3 (half), c: 3 (other half)-5
    everything = set(files)
    assert T.piece_priorities(lay, everything) == [7, 6, 5, 4, 3, 2]  # earlier bytes first
    assert T.piece_priorities(lay, {"b.bin"}) == [0, 0, 0, 4, 0, 0]  # a piece touching a wanted file counts
    assert T.piece_priorities(lay, {"a.bin", "c.bin"}, share=(1, 3)) == [1, 7, 1, 1, 7, 1]
    assert T.piece_priorities(lay, {"c.bin"}, share=(0, 2)) == [0, 0, 0, 1, 7, 1]


def test_share_batches_fetch_big_files_alone_and_small_ones_together() -> None:
    big, small = T.SMALL_FILE, 10
    es = sized(small, small, big, big + 1, small, big, small, small)
    assert [[es.index(e) for e in b] for b in T.share_batches(es)] == [[0, 1], [2], [3], [4], [5], [6, 7]]
    assert T.share_batches([]) == []
