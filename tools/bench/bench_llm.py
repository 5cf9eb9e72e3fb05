#!/usr/bin/env python3
"""PyTorch transformers side of the LLM benchmark (see backend/models/examples/bench_llm.rs).

    .venv/bin/python tools/bench/bench_llm.py [llama|opt|all]

Random-weight Llama and OPT with the same configs as the Rust example, f32, BENCH_THREADS threads (2), best of 3:
prefill 128 tokens, then decode 64 tokens one at a time with the KV cache.
"""

import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from memory import status_mib  # tools/bench/memory.py, next to this script

PREFILL, DECODE, REPEATS = 128, 64, 3


def build(kind):
    if kind == "llama":
        c = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
        return LlamaForCausalLM(c).eval()
    c = OPTConfig(vocab_size=32000, hidden_size=512, ffn_dim=2048, num_hidden_layers=8, num_attention_heads=8,
                  max_position_embeddings=512, word_embed_proj_dim=512)
    return OPTForCausalLM(c).eval()


def main():
    """bench_llm.py [llama|opt|all]: one model per process gives that model's own peak memory."""
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    base_rss = status_mib("VmRSS:")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    ids = torch.tensor([[(i * 7919) % 32000 for i in range(PREFILL + DECODE)]])
    for kind in ["llama", "opt"]:
        if which not in ("all", kind):
            continue
        m = build(kind)
        best_pre, best_dec = float("inf"), float("inf")
        with torch.inference_mode():
            for _ in range(REPEATS):
                t = time.perf_counter()
                out = m(input_ids=ids[:, :PREFILL], use_cache=True)
                best_pre = min(best_pre, time.perf_counter() - t)
                past = out.past_key_values
                t = time.perf_counter()
                for i in range(PREFILL, PREFILL + DECODE):
                    out = m(input_ids=ids[:, i:i + 1], past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    out.logits.argmax(-1)
                best_dec = min(best_dec, time.perf_counter() - t)
        print(f"torch {kind}: prefill {PREFILL / best_pre:.0f} tok/s ({PREFILL} tokens in {best_pre:.3f} s), "
              f"decode {DECODE / best_dec:.1f} tok/s ({DECODE} tokens in {best_dec:.3f} s)")
        print(json.dumps({"impl": "pytorch", "case": f"llm_{kind}",
                          "prefill_tok_s": round(PREFILL / best_pre, 1),
                          "decode_tok_s": round(DECODE / best_dec, 2),
                          "peak_rss_mib": round(status_mib("VmHWM:")),
                          "base_rss_mib": round(base_rss)}), flush=True)


if __name__ == "__main__":
    main()
