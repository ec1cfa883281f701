#!/usr/bin/env python3
"""Writes a Hugging Face checkpoint as a GGUF file the way llama.cpp's convert_hf_to_gguf.py
does, with the `gguf` package's writer and its tensor-name maps. Nothing here shares code with
fpx. Run by tests/transformers_models.rs with the interpreter of .venv (numpy + gguf).

  gguf_tiny.py --model DIR --out FILE.gguf [--type f32|q8_0]

`--type q8_0` stores every matrix (2-D and stacked 3-D) in Q8_0 with gguf.quants (rows are
quantized on their own, so each expert of a stack is a whole number of blocks); vectors stay F32.

DIR holds config.json (a Llama, Qwen3, Qwen3-MoE or Mixtral config as transformers saves it),
model.safetensors
(FP32, read here with numpy) and tokenizer.json (a byte-level BPE). What convert_hf_to_gguf.py
does and this does too:
  - tensor names from gguf.get_tensor_name_map (blk.N.attn_q.weight, blk.N.attn_q_norm.weight..);
  - llama: q_proj / k_proj rows permuted for llama.cpp's interleaved RoPE (LlamaModel.permute);
    qwen3: no permutation;
  - llama3 rope scaling as a `rope_freqs` tensor of one factor per rotated pair
    (LlamaModel.generate_extra_tensors), with no rope scaling metadata; linear scaling as
    rope.scaling.type / rope.scaling.factor;
  - the first eos_token_id as tokenizer.ggml.eos_token_id, a second as eot_token_id;
  - mixture of experts: Qwen3-MoE as `qwen3moe` (Qwen2MoeModel: expert_count,
    expert_used_count, expert_feed_forward_length), Mixtral as `llama` (LlamaModel:
    expert_count, expert_used_count; q/k permuted); each block's experts stacked into one
    [experts, out, in] tensor per projection (`blk.N.ffn_gate_exps` ...), the router as
    `blk.N.ffn_gate_inp`; a Qwen3-MoE block in mlp_only_layers keeps ffn_gate/up/down.
Prints one JSON object: {"rope_freqs": [...] or null}.
"""

import argparse
import json
import math
import re
import struct
import sys

import numpy as np
import gguf


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise SystemExit(f"{name}: dtype {info['dtype']}, this script reads F32 only")
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=np.float32).reshape(info["shape"])
    return out


def permute(w, n_head):
    # convert_hf_to_gguf.py LlamaModel.permute
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def rope_params(c):
    p = c.get("rope_scaling") or c.get("rope_parameters") or {}
    return p, p.get("rope_type", p.get("type", "default")), p.get("rope_theta", c.get("rope_theta", 10000.0))


def llama3_factors(c, head_dim):
    # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, in float32 as torch computes it.
    p, _, base = rope_params(c)
    freqs = 1.0 / (np.float32(base) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    factor = p.get("factor", 8.0)
    low = p.get("low_freq_factor", 1.0)
    high = p.get("high_freq_factor", 4.0)
    old = c.get("original_max_position_embeddings") or p.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def stack_experts(tensors):
    """Each block's per-expert projections as one [experts, out, in] tensor, named as
    convert_hf_to_gguf.py names the merged tensor before its name map (Qwen2MoeModel:
    `model.layers.N.mlp.experts.gate_proj`; LlamaModel for Mixtral:
    `layers.N.feed_forward.experts.w1`)."""
    out, stacks = {}, {}
    pat = re.compile(r"model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
    for name, t in tensors.items():
        m = pat.fullmatch(name)
        if m is None:
            out[name] = t
            continue
        bid, block, xid, proj = m.groups()
        merged = (f"model.layers.{bid}.mlp.experts.{proj}" if block == "mlp"
                  else f"layers.{bid}.feed_forward.experts.{proj}")
        stacks.setdefault(merged, {})[int(xid)] = t
    for merged, by_expert in stacks.items():
        out[merged + ".weight"] = np.stack([by_expert[x] for x in sorted(by_expert)])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--type", choices=["f32", "q8_0"], default="f32")
    args = ap.parse_args()
    with open(f"{args.model}/config.json") as f:
        c = json.load(f)
    with open(f"{args.model}/tokenizer.json") as f:
        tok = json.load(f)
    arch_name = c["model_type"]
    arch_name = {"qwen3_moe": "qwen3moe", "mixtral": "llama"}.get(arch_name, arch_name)
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3,
            "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE}[arch_name]
    n_layer, n_head = c["num_hidden_layers"], c["num_attention_heads"]
    n_kv = c.get("num_key_value_heads") or n_head
    head_dim = c.get("head_dim") or c["hidden_size"] // n_head

    w = gguf.GGUFWriter(args.out, arch_name)
    w.add_block_count(n_layer)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    params, rope_type, theta = rope_params(c)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_vocab_size(c["vocab_size"])
    experts = c.get("num_experts") or c.get("num_local_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(c["num_experts_per_tok"])
        if arch == gguf.MODEL_ARCH.QWEN3MOE:
            w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(params["factor"])

    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["id"] for t in tok["added_tokens"] if t.get("special")}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                       for _, i in vocab])
    w.add_token_merges(tok["model"]["merges"])
    eos = c.get("eos_token_id")
    eos = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    if c.get("bos_token_id") is not None:
        w.add_bos_token_id(c["bos_token_id"])
    if eos:
        w.add_eos_token_id(eos[0])
    if len(eos) > 1:
        w.add_eot_token_id(eos[1])

    factors = None
    if rope_type == "llama3":
        factors = llama3_factors(c, head_dim)
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)
    names = gguf.get_tensor_name_map(arch, n_layer)
    for name, t in stack_experts(read_safetensors(f"{args.model}/model.safetensors")).items():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise SystemExit(f"no llama.cpp name for {name}")
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith("q_proj.weight"):
            t = permute(t, n_head)
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith("k_proj.weight"):
            t = permute(t, n_kv)
        t = np.ascontiguousarray(t)
        if args.type == "q8_0" and t.ndim >= 2:
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(new, gguf.quants.quantize(t, q), raw_dtype=q)
        else:
            w.add_tensor(new, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    json.dump({"rope_freqs": None if factors is None else factors.tolist()}, sys.stdout)


if __name__ == "__main__":
    main()
