#!/usr/bin/env bash
# The wheels a GPU machine lacks for benchmarks/gpu.py, built on any machine with pip.
#
# The GPU machine already has torch, lightning, torchmetrics and tensorboard (and what they need,
# PyYAML included) but no network: it gets jsonargparse with its [signatures] extras and this
# project's own wheel, installed with --no-deps beside what is there, never replacing its torch.
#
#   benchmarks/gpu_bundle.sh [FOLDER]      # default: gpu_bundle/ (git-ignored); at most 60 MiB
set -euo pipefail
cd "$(dirname "$0")/.."
bundle="${1:-gpu_bundle}"
rm -rf "$bundle"
mkdir -p "$bundle"
# jsonargparse[signatures] = docstring-parser + typeshed-client (+ typing-extensions, which
# typeshed-client needs). Pure-Python wheels: they install on any Python 3 the GPU machine has.
python3 -m pip download --quiet --no-deps --only-binary :all: -d "$bundle" \
    "jsonargparse>=4.32" "docstring-parser>=0.17" "typeshed-client>=2.8.2" "typing-extensions>=4.5"
python3 -m pip wheel --quiet --no-deps --no-build-isolation -w "$bundle" . 2>/dev/null \
    || python3 -m pip wheel --quiet --no-deps -w "$bundle" .
size=$(du -sk "$bundle" | cut -f1)
if [ "$size" -gt $((60 * 1024)) ]; then
    echo "error: $bundle holds $((size / 1024)) MiB, more than the 60 MiB a GPU run may carry" >&2
    exit 1
fi
echo "$bundle: $(ls "$bundle" | wc -l) wheels, $(du -sh "$bundle" | cut -f1)"
echo "On the GPU machine, from the repository root (\$OUT: the folder whose files come back):"
echo "  python -m pip install --quiet --no-deps --target .gpu_site $bundle/*.whl"
echo "  PYTHONPATH=\$PWD/.gpu_site python benchmarks/gpu.py --out \$OUT"
