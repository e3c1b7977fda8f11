#!/usr/bin/env bash
# Here, before a session's one GPU run: what benchmarks/gpu_check.sh needs on the GPU machine and cannot
# fetch there (it reaches no network). Two ignored folders of the checkout, which the device run carries:
#   .whl/        wheels (CPython 3.12, manylinux) of the packages the GPU image lacks, at this venv's versions
#   .gpu-shared/ stories260K and the instruction data, copied from ../shared (which does not travel)
# Then: run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu-shared"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
for folder in /.whl/ /.gpu-shared/; do grep -qxF "$folder" .git/info/exclude || echo "$folder" >> .git/info/exclude; done
rm -rf .whl .gpu-shared && mkdir -p .whl .gpu-shared/models .gpu-shared/data/instruct
cp -r ../shared/models/stories260K .gpu-shared/models/
cp ../shared/data/instruct/alpaca_en_demo.json .gpu-shared/data/instruct/
# What the service and the benchmarks import that the image (see /work/.library/device/KINDS.md) lacks.
NEEDED="pydantic pydantic_core annotated-types typing-inspection pydantic-settings python-dotenv hjson
  SQLAlchemy alembic Mako fastapi starlette uvicorn python-multipart celery kombu billiard vine amqp
  click-didyoumean click-plugins click-repl prompt_toolkit wcwidth tzlocal lomo-optim"
FREEZE=$(.venv/bin/pip list --format=freeze)
for name in $NEEDED; do
  pinned=$(grep -i "^${name}==" <<<"$FREEZE" || true)
  [ -n "$pinned" ] || { echo "not in .venv: $name" >&2; exit 1; }
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pinned"
done
# DeepSpeed publishes no wheel: build a pure one (no compiled ops) from this venv's version.
DS_BUILD_OPS=0 .venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl "$(grep -i '^deepspeed==' <<<"$FREEZE")"
du -sh .whl .gpu-shared
