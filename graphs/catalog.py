"""Constants of well-known models, so a spec can list a model by name alone.

M (non-embedding parameters), L (layers), D (hidden size) and prices are those of the
papers' code (one price per 1M tokens for prompt and completion alike). Prefill/decode
rates are typical single-GPU serving rates; a spec overrides any of them.
"""

from __future__ import annotations

from graphtune.graphs.cost import ModelInfo

KNOWN_MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in [
        ModelInfo("llama-3.2-1b", 1e9, 16, 2048, 0.02, 0.02, prefill_tok_s=20000, decode_tok_s=250),
        ModelInfo("llama-3.2-3b", 3e9, 28, 3072, 0.06, 0.06, prefill_tok_s=10000, decode_tok_s=150),
        ModelInfo("llama-3.1-8b", 8e9, 32, 4096, 0.18, 0.18, prefill_tok_s=6000, decode_tok_s=90),
        ModelInfo("llama-3.1-70b", 70e9, 80, 8192, 0.88, 0.88, prefill_tok_s=1500, decode_tok_s=30),
    ]
}

#: The paper's pool, in size order.
LLAMA_POOL = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b")
