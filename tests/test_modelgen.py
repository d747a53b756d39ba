"""Generated models are real: the safetensors we write by hand load with the ``safetensors`` library."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy as st_numpy

from agent.modelgen import MiB, Tensor, make_model_dir, write_safetensors


def test_sharded_model_loads_with_the_real_library(tmp_path: Path) -> None:
    files = make_model_dir(tmp_path, weight_bytes=3 * MiB, shards=3, seed=7)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) == 3 and set(index["weight_map"].values()) == set(shards)
    total = 0
    for name in shards:
        with safetensors.safe_open(str(tmp_path / name), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                arr = f.get_tensor(key)
                assert arr.dtype == np.float16 and np.isfinite(arr).all() and index["weight_map"][key] == name
                total += arr.nbytes
    assert abs(total - 3 * MiB) < 64 * 1024


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a, b, c = (tmp_path / x for x in "abc")
    make_model_dir(a, weight_bytes=MiB, seed=1)
    make_model_dir(b, weight_bytes=MiB, seed=1)
    make_model_dir(c, weight_bytes=MiB, seed=2)
    w = "model.safetensors"
    assert (a / w).read_bytes() == (b / w).read_bytes() != (c / w).read_bytes()


def test_header_layout_and_a_wrong_tensor_size_is_refused(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "x.safetensors", [Tensor("t", "F16", (2,), 4, [b"\x00\x3c\x00\x40"])])
    raw = (tmp_path / "x.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and json.loads(raw[8:8 + n]) == {"t": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}
    assert np.array_equal(st_numpy.load(raw)["t"], np.array([1.0, 2.0], np.float16))
    with pytest.raises(ValueError, match="tensor t has 2 bytes, its header says 4"):
        write_safetensors(tmp_path / "y.safetensors", [Tensor("t", "F16", (2,), 4, [b"\x00\x3c"])])


def test_the_agent_and_the_demo_import_neither_numpy_nor_safetensors(tmp_path: Path) -> None:
    code = ("import sys; from agent.cli import main; rc = main(['demo', '--size', '1M', '--dir', sys.argv[1]]); "
            "bad = sorted(m for m in ('numpy', 'safetensors', 'torch') if m in sys.modules); "
            "print('LOADED', bad); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "LOADED []" in r.stdout
