#!/usr/bin/env bash
# Regenerate the gRPC stubs (ModelExpress model.proto, grpc.health.v1 health.proto).
#
# grpcio-tools is pinned to 1.66.2 because it bundles protoc for Protobuf 5.27.2: the generated
# code calls ValidateProtobufRuntimeVersion(5, 27, 2) and so runs on protobuf 5.27.2 .. 6.x (the
# range the project and NVIDIA's client accept). Newer grpcio-tools emit gencode that needs
# protobuf >= 6.x/7.x. The *_grpc.py import is made relative so the package works as
# agent.sources._proto.
#
#   python -m venv /tmp/regen && /tmp/regen/bin/pip install grpcio-tools==1.66.2
#   PYTHON=/tmp/regen/bin/python agent/sources/_proto/regen.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python}"
"$PYTHON" -c 'import grpc_tools, importlib.metadata as m; v = m.version("grpcio-tools"); assert v == "1.66.2", v'
"$PYTHON" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. model.proto health.proto
for m in model health; do
  sed -i "s/^import ${m}_pb2 as ${m}__pb2\$/from . import ${m}_pb2 as ${m}__pb2/" "${m}_pb2_grpc.py"
  grep -q "^from \. import ${m}_pb2 as ${m}__pb2\$" "${m}_pb2_grpc.py"
done
grep -n 'ValidateProtobufRuntimeVersion' -A5 model_pb2.py | tr -d '\n'; echo
