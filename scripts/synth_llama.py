#!/usr/bin/env python3
"""Writes a random-weight Llama checkpoint of a given size as a Hugging Face directory (bf16
safetensors, one tensor at a time), for benchmarking `fpx export` at scale (README, "Serving
a plan"). The tokenizer is copied from an existing directory (its vocabulary sets vocab_size).

  synth_llama.py OUT --tokenizer-from DIR [--hidden 2048 --layers 16 --ffn 8192 --heads 32 --kv-heads 8]
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--tokenizer-from", required=True)
p.add_argument("--hidden", type=int, default=2048)
p.add_argument("--layers", type=int, default=16)
p.add_argument("--ffn", type=int, default=8192)
p.add_argument("--heads", type=int, default=32)
p.add_argument("--kv-heads", type=int, default=8)
a = p.parse_args()
os.makedirs(a.out, exist_ok=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(a.tokenizer_from, f), a.out)
vocab = len(json.load(open(os.path.join(a.out, "tokenizer.json")))["model"]["vocab"])
h, hd = a.hidden, a.hidden // a.heads
rng = np.random.default_rng(0)


def t(*shape, scale=0.02):
    return torch.from_numpy((rng.standard_normal(shape, dtype=np.float32) * scale)).to(torch.bfloat16)


tensors = {"model.embed_tokens.weight": t(vocab, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
for i in range(a.layers):
    p_ = f"model.layers.{i}."
    tensors.update({
        p_ + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        p_ + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        p_ + "self_attn.q_proj.weight": t(a.heads * hd, h),
        p_ + "self_attn.k_proj.weight": t(a.kv_heads * hd, h),
        p_ + "self_attn.v_proj.weight": t(a.kv_heads * hd, h),
        p_ + "self_attn.o_proj.weight": t(h, a.heads * hd),
        p_ + "mlp.gate_proj.weight": t(a.ffn, h),
        p_ + "mlp.up_proj.weight": t(a.ffn, h),
        p_ + "mlp.down_proj.weight": t(h, a.ffn),
    })
save_file(tensors, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
          "intermediate_size": a.ffn, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
          "num_key_value_heads": a.kv_heads, "head_dim": hd, "vocab_size": vocab, "rope_theta": 500000.0,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "max_position_embeddings": 8192,
          "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
json.dump(config, open(os.path.join(a.out, "config.json"), "w"), indent=1)
print(sum(v.numel() for v in tensors.values()), "parameters")
