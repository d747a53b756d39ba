"""Install a model with NVIDIA's own ModelExpress client (``modelexpress.model_client``).

Runs under the interpreter named by ``MX_CLIENT_PYTHON`` (a separate venv holding ``modelexpress``
and the CPU torch it imports), so it must not import anything from this repo. It does what a
worker does: metadata snapshot first, then the weights, and prints one JSON line with the
snapshot path, the seconds each phase took and the CPU seconds of the install (all threads).
Used by tests/test_mx_nvidia_client.py and the benchmark.

    $MX_CLIENT_PYTHON tests/peers/mx_nvidia_client.py ADDRESS MODEL CACHE_DIR [REVISION] [CHUNK_SIZE]
"""

import json
import logging
import sys
import time


def main() -> None:
    address, model, cache = sys.argv[1:4]
    revision = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None
    chunk = int(sys.argv[5]) if len(sys.argv) > 5 else None
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    from modelexpress.model_client import ModelCacheClient  # pulls torch: time it apart

    t1, c1 = time.perf_counter(), time.process_time()
    with ModelCacheClient(server_url=address, cache_directory=cache, chunk_size=chunk) as client:
        snapshot = client.install_metadata_snapshot(model, requested_revision=revision)
        t2 = time.perf_counter()
        client.install_weight_files(model, snapshot)
        t3, c3 = time.perf_counter(), time.process_time()
    print(json.dumps({"snapshot": str(snapshot), "import_s": t1 - t0, "metadata_s": t2 - t1,
                      "weights_s": t3 - t2, "install_s": t3 - t1, "install_cpu_s": c3 - c1}))


if __name__ == "__main__":
    main()
