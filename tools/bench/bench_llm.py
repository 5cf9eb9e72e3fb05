#!/usr/bin/env python3
"""PyTorch transformers side of the LLM benchmark (see backend/models/examples/bench_llm.rs).

    .venv/bin/python tools/bench/bench_llm.py

Random-weight Llama and OPT with the same configs as the Rust example, f32, 2 threads, best of 3:
prefill 128 tokens, then decode 64 tokens one at a time with the KV cache.
"""

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

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
    torch.set_num_threads(2)
    ids = torch.tensor([[(i * 7919) % 32000 for i in range(PREFILL + DECODE)]])
    for kind in ["llama", "opt"]:
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


if __name__ == "__main__":
    main()
