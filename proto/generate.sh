#!/usr/bin/env bash
# Regenerate the Python stubs of proto/pdserve/v1/*.proto. The generated files are
# committed, so users and CI need no protoc; run this after editing a .proto.
#
#   bash proto/generate.sh            (or `make proto`)
#
# Which protoc: stubs embed the protobuf version that generated them, and newer
# generators add import-time gates (protobuf >= gencode version, grpcio >= the
# generator's version). We generate with an old, pinned grpcio-tools (protobuf 4.25
# gencode, no gates) so the same stubs load under every protobuf runtime from 4.25 to
# 7.x and every grpcio with asyncio support -- a GPU image's preinstalled versions
# included. The generator lives in its own cached virtualenv, never in the project's.
# PROTOC_PYTHON=/path/to/python overrides it (that Python must have grpcio-tools).
set -euo pipefail

GRPC_TOOLS_VERSION="${GRPC_TOOLS_VERSION:-1.62.3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ -z "${PROTOC_PYTHON:-}" ]]; then
  venv="${XDG_CACHE_HOME:-$HOME/.cache}/pdserve/grpcio-tools-${GRPC_TOOLS_VERSION}"
  if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q "grpcio-tools==${GRPC_TOOLS_VERSION}"
  fi
  PROTOC_PYTHON="$venv/bin/python"
fi

cd "$here"
"$PROTOC_PYTHON" -m grpc_tools.protoc -I . \
  --python_out=. --grpc_python_out=. \
  pdserve/v1/*.proto

# protoc writes imports relative to the include root (`from pdserve.v1 import ...`);
# the stubs live in this project's `proto` package, so point them there. The include
# root stays `proto/` so descriptors (and reflection) name the file
# "pdserve/v1/generation.proto", the path other .proto files would import.
sed -i 's/^from pdserve\.v1 import /from proto.pdserve.v1 import /' pdserve/v1/*_pb2_grpc.py
echo "generated with $("$PROTOC_PYTHON" -m grpc_tools.protoc --version):" pdserve/v1/*_pb2*
