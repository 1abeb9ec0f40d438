#!/usr/bin/env bash
# Build llama.cpp's own C++ llama-server from the exact llama.cpp source that the installed llama-cpp-python
# vendors (its sdist carries vendor/llama.cpp), once: the strongest CPU peer for bench/. Only the llama-server
# target is built (about 10 minutes on 2 cores). The result is cached outside the repository:
#   $GALLAMA_BENCH_CACHE (default ~/.cache/gallama-bench)/llama-server-<llama-cpp-python version>/llama-server
# Usage: bench/build_llama_server.sh [PYTHON]   (PYTHON: the environment whose llama-cpp-python to match)
set -euo pipefail
python=${1:-.venv/bin/python}
version=$("$python" -c 'import llama_cpp; print(llama_cpp.__version__)')
cache=${GALLAMA_BENCH_CACHE:-$HOME/.cache/gallama-bench}
target="$cache/llama-server-$version"
if [ -x "$target/llama-server" ]; then
    echo "$target/llama-server"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
source_dir="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$source_dir" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$target"
cp "$work/build/bin/llama-server" "$target/llama-server"
echo "$target/llama-server"
