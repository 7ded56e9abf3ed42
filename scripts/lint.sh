#!/usr/bin/env bash
# The project's style checks: ruff (pyproject.toml) on the Python, clang-format (.clang-format)
# on csrc/. Fails on the first finding; `ruff check --fix .` and `clang-format -i FILES` mend most.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' | sort | xargs clang-format --dry-run -Werror
echo "lint: ok"
