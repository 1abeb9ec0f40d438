"""Write the tiny random-weight Llama the GPU tests use (``tests/exllama_folder.make_tiny_llama``) into a folder,
for ``gallama run`` to serve: a bare machine has no model and cannot download one.

Its context is 8192 tokens here, not the tests' 2048: its byte-level tokenizer spends about a token per byte, and
the e2e requests carry tool schemas and the artifact format's instructions (several thousand bytes), while the
bench's agent loop grows a conversation over several turns.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: exllama_folder

from checklib import progress, report
from exllama_folder import TINY_LLAMA, make_tiny_llama

CONTEXT = 8192


def main() -> None:
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    make_tiny_llama(folder, context=CONTEXT)
    size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    progress(f"model: tiny Llama written to {folder} ({size:.1f} MiB)")
    report(f"- model folder {folder}: {TINY_LLAMA['num_hidden_layers']} layers, hidden "
           f"{TINY_LLAMA['hidden_size']}, context {CONTEXT}, random FP16 weights "
           f"({size:.1f} MiB)")


if __name__ == "__main__":
    main()
