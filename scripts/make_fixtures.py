#!/usr/bin/env python3
"""Writes the parity fixtures that crates/model/tests check the Rust decoder against.

An independent implementation (Hugging Face `transformers`, PyTorch, CPU, float32) builds two tiny
random Llama models, saves them as Hugging Face directories and records their logits for a fixed
input. It also records what `transformers` computes from the bundled SmolLM2 GGUF (its own
dequantization and tokenizer), so the real-model loader is checked against it too.

Run once when the fixtures change (`make fixtures`); the outputs are committed, so tests and CI
never need PyTorch. Needs: torch, transformers, safetensors, gguf, numpy.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "model", "tests", "fixtures")
INPUT_IDS = [1, 17, 93, 4, 55, 23, 88, 8, 61, 2, 40, 77]

TINY = {
    "tiny-gqa-tied": dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True, rope_theta=10000.0,
        rms_norm_eps=1e-5, max_position_embeddings=256,
    ),
    "tiny-mha-untied": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
        num_key_value_heads=3, vocab_size=100, tie_word_embeddings=False, rope_theta=500000.0,
        rms_norm_eps=1e-6, max_position_embeddings=128,
    ),
}


def tiny(name, kwargs):
    torch.manual_seed(1234)
    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, initializer_range=0.2, **kwargs)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        # Norm weights are ones at init; randomise them so the test sees them used.
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    out = os.path.join(OUT, name)
    model.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        logits = model(torch.tensor([INPUT_IDS])).logits[0]
    json.dump({"input_ids": INPUT_IDS, "vocab": cfg.vocab_size,
               "logits": [round(float(x), 7) for x in logits.flatten()]},
              open(os.path.join(out, "expected.json"), "w"))
    print(name, "logits", tuple(logits.shape), "max |logit|", float(logits.abs().max()))


def real(gguf_path):
    d, f = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    prompts = ["The capital of France is", "In the beginning God created the heaven and the earth. 1234"]
    records = []
    for p in prompts:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, 10)
        records.append({"prompt": p, "ids": ids, "top_ids": top.indices.tolist(),
                        "top_logits": [round(float(x), 5) for x in top.values],
                        "first_logits": [round(float(x), 5) for x in logits[:64]]})
        print(p, ids, top.indices.tolist()[:5])
    json.dump(records, open(os.path.join(OUT, "smollm2-gguf-reference.json"), "w"), indent=1)


if __name__ == "__main__":
    for name, kwargs in TINY.items():
        tiny(name, kwargs)
    if len(sys.argv) > 1:
        real(sys.argv[1])
