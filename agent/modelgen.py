"""Make small but real Hugging Face models on disk (for the demo, tests and benchmarks; no network).

A model is a folder of real files: ``config.json``, a WordLevel ``tokenizer.json`` that the
``tokenizers`` library loads, and safetensors weights (sharded with an index when asked).
``write_hub_layout`` then lays such a folder out as a Hub cache (blobs named by sha256 / git sha1,
relative snapshot symlinks, refs), as a Download Job leaves a PVC.

The safetensors files are written here, not with the ``safetensors`` package, so the agent needs
neither it nor numpy at run time. The format is small: an 8-byte little-endian header length, a
JSON header (per tensor: dtype, shape, byte offsets into the data; padded with spaces to 8 bytes),
then the raw tensor bytes back to back. A test loads our files with the real library.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.cache.hashing import hash_file
from agent.cache.layout import blob_link_target, repo_folder_name
from agent.core.plan import guess_algo

MiB = 1024 * 1024
CHUNK = 4 * MiB
# float16 little-endian: clearing bit 6 of the high byte keeps the exponent below 31 (no inf/nan)
# and every value in (-2, 2), like small random weights.
_FINITE_F16_HIGH = bytes(b & 0xBF for b in range(256))
F16_ONE = b"\x00\x3c"
VOCAB = ["[UNK]", "[PAD]", "<s>", "</s>", "hello", "world", "model", "cache", "node", "warm", "gpu", "fast"]


def _config(hidden: int, vocab: int, layers: int) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": hidden * 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "torch_dtype": "float16", "bos_token_id": 2, "eos_token_id": 3,
    }


def _tokenizer() -> dict[str, object]:
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(VOCAB)}, "unk_token": "[UNK]"},
    }


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # safetensors dtype code: F16, F32, I64, ...
    shape: tuple[int, ...]
    nbytes: int
    data: Iterable[bytes]  # exactly ``nbytes`` in total, streamed so big shards never sit in memory


def f16_noise(seed: bytes, nbytes: int) -> Iterator[bytes]:
    """Deterministic pseudo-random finite float16 bytes (SHAKE-128 of the seed, chunk by chunk)."""
    for i, off in enumerate(range(0, nbytes, CHUNK)):
        buf = bytearray(hashlib.shake_128(seed + i.to_bytes(8, "little")).digest(min(CHUNK, nbytes - off)))
        buf[1::2] = buf[1::2].translate(_FINITE_F16_HIGH)
        yield bytes(buf)


def write_safetensors(path: Path, tensors: Sequence[Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file: header length (u64 LE), JSON header padded to 8 bytes, tensor bytes."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            written = 0
            for chunk in t.data:
                f.write(chunk)
                written += len(chunk)
            if written != t.nbytes:
                raise ValueError(f"{path}: tensor {t.name} has {written} bytes, its header says {t.nbytes}")


def make_model_dir(
    dest: Path, *, weight_bytes: int = 50 * MiB, shards: int = 1, seed: int = 0, nested: bool = True,
) -> list[str]:
    """Write a tiny Llama-shaped model into ``dest``; returns the relative paths written.

    Weights are float16 tensors of random values, split over ``shards`` safetensors files so that
    together they hold about ``weight_bytes`` bytes.
    """
    dest.mkdir(parents=True, exist_ok=True)
    hidden = 64
    layers = max(shards, 1)
    written: list[str] = []

    def put(rel: str, data: bytes | str) -> None:
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        written.append(rel)

    put("config.json", json.dumps(_config(hidden, len(VOCAB), layers), indent=2))
    put("generation_config.json", json.dumps({"bos_token_id": 2, "eos_token_id": 3, "seed": seed}))
    put("tokenizer.json", json.dumps(_tokenizer()))
    put("tokenizer_config.json", json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}))
    put("special_tokens_map.json", json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "[UNK]"}))
    put("README.md", f"# tiny test model (seed {seed})\n\nGenerated by model-cache-agent; not for inference.\n")
    if nested:
        put("original/params.json", json.dumps({"dim": hidden, "n_layers": layers, "seed": seed}))

    per_shard = max(weight_bytes // max(shards, 1), 4096)
    weight_map: dict[str, str] = {}
    names = (
        ["model.safetensors"] if shards <= 1
        else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    )
    for i, name in enumerate(names):
        elems = per_shard // 2
        rows = max(elems // hidden, 1)
        tensor_name = f"model.layers.{i}.mlp.weight"
        norm_name = f"model.layers.{i}.norm.weight"
        write_safetensors(dest / name, [
            Tensor(tensor_name, "F16", (rows, hidden), rows * hidden * 2,
                   f16_noise(f"{seed}/{name}".encode(), rows * hidden * 2)),
            Tensor(norm_name, "F16", (hidden,), hidden * 2, [F16_ONE * hidden]),
        ], metadata={"format": "pt"})
        written.append(name)
        weight_map[tensor_name] = name
        weight_map[norm_name] = name
    if shards > 1:
        total = sum((dest / n).stat().st_size for n in names)
        put("model.safetensors.index.json", json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return sorted(written)


def fake_commit(paths_and_digests: Iterable[tuple[str, str]], salt: str = "") -> str:
    """A deterministic 40-hex commit id for a file set (stands in for a git commit)."""
    h = hashlib.sha1(salt.encode())
    for p, d in sorted(paths_and_digests):
        h.update(f"{p}\0{d}\n".encode())
    return h.hexdigest()


def file_digests(src: Path) -> dict[str, tuple[str, str, int]]:
    """path -> (algo, Hub digest, size) for every file in a model folder, by the LFS rule."""
    out: dict[str, tuple[str, str, int]] = {}
    for p in sorted(src.rglob("*")):
        if p.is_file():
            rel = p.relative_to(src).as_posix()
            size = p.stat().st_size
            algo = guess_algo(rel, size)
            out[rel] = (algo, hash_file(p, algo, size=size).digest, size)
    return out


def write_hub_layout(
    src: Path, hub: Path, repo: str, *, commit: str | None = None, refs: Iterable[str] = ("main",),
    symlinks: bool = True, move: bool = False,
) -> str:
    """Lay a model folder out as a Hub cache under ``hub`` and return the commit.

    ``symlinks=False`` writes plain files in the snapshot (as ModelExpress's client does).
    ``move=True`` moves big files instead of copying (for benchmarks that cannot afford two copies).
    """
    digests = file_digests(src)
    commit = commit or fake_commit((p, d) for p, (_, d, _) in digests.items())
    repo_dir = hub / repo_folder_name(repo)
    snap = repo_dir / "snapshots" / commit
    for rel, (_algo, digest, _size) in digests.items():
        dst = snap / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if symlinks:
            blob = repo_dir / "blobs" / digest
            blob.parent.mkdir(parents=True, exist_ok=True)
            if not blob.exists():
                (shutil.move if move else shutil.copyfile)(str(src / rel), str(blob))
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            os.symlink(blob_link_target(rel, digest), dst)
        else:
            (shutil.move if move else shutil.copyfile)(str(src / rel), str(dst))
    for ref in refs:
        rp = repo_dir / "refs" / ref
        rp.parent.mkdir(parents=True, exist_ok=True)
        rp.write_text(commit)
    return commit


def make_hub_model(
    hub: Path, repo: str, *, weight_bytes: int = 2 * MiB, shards: int = 1, seed: int = 0,
    refs: Iterable[str] = ("main",), symlinks: bool = True, workdir: Path | None = None,
) -> str:
    """make_model_dir + write_hub_layout in one call; returns the commit."""
    work = workdir or hub.parent / f".gen-{os.getpid()}-{seed}"
    if work.exists():
        shutil.rmtree(work)
    make_model_dir(work, weight_bytes=weight_bytes, shards=shards, seed=seed)
    try:
        return write_hub_layout(work, hub, repo, refs=refs, symlinks=symlinks, move=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_files(src: Path) -> Mapping[str, bytes]:
    return {p.relative_to(src).as_posix(): p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}
