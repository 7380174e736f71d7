#!/usr/bin/env bash
# Regenerates migctl/wire/ from proto/. The -I mapping makes the generated modules
# import each other as migctl.wire.miglet.*, while the protobuf package stays
# miglet.commands (the wire name deployed agents use).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here}
python -m grpc_tools.protoc -I"migctl/wire=$here/proto" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  "$here/proto/miglet/commands.proto"
touch "$out/migctl/wire/__init__.py" "$out/migctl/wire/miglet/__init__.py"
