#!/usr/bin/env python3
"""Builds a tiny random model with transformers itself and prints its logits.

Run by the Rust tests (tests/transformers_models.rs) with the interpreter of .venv-ct
(transformers + torch on the CPU); prints one JSON object on stdout.

  hf_tiny.py --config C.json --out DIR --tokens T.json [--new N] [--seed S]
      AutoModelForCausalLM.from_config(AutoConfig.for_model(**C)) in FP32 with torch's
      seed S (no download), every RMSNorm weight then drawn as 1 + 0.1 N(0, 1) (transformers
      initialises them to ones, which would hide a norm applied with the wrong weight), saved
      with save_pretrained(DIR) (safetensors). Prints
        logits     the logits of every position of T (a list of token ids), [len(T), vocab]
        greedy     N tokens of greedy decoding after T (full forward each step, no cache)
        ablated    {feature: largest |logits - logits without it| / max |logits|}: the same
                   weights in a model without each feature C uses, so a test can tell that
                   the feature changes the result: "rope_scaling" (the config without it),
                   "sliding_window" (without the window), "qk_norm" (qwen3's weights in a
                   Llama of the same shape, without q_norm / k_norm), "top_k" (a MoE model
                   routing every token to all its experts), "norm_topk_prob" (a Qwen3-MoE
                   without renormalised top-k weights)
"""

import argparse
import json
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def build(config):
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def logits_of(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with open(args.config) as f:
        config = json.load(f)
    with open(args.tokens) as f:
        tokens = json.load(f)

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(build(config), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(args.out)
    logits = logits_of(model, tokens)

    greedy, seq = [], list(tokens)
    for _ in range(args.new):
        nxt = int(logits_of(model, seq)[-1].argmax())
        greedy.append(nxt)
        seq.append(nxt)

    def differs(other_config, strict=True):
        other = AutoModelForCausalLM.from_config(build(other_config), dtype=torch.float32).eval()
        other.load_state_dict(model.state_dict(), strict=strict)
        diff = (logits_of(other, tokens) - logits).abs().max()
        return float(diff / logits.abs().max())

    ablated = {}
    if config.get("rope_scaling") or config.get("rope_parameters"):
        plain = dict(config)
        plain.pop("rope_scaling", None)
        plain.pop("rope_parameters", None)
        ablated["rope_scaling"] = differs(plain)
    if config.get("sliding_window") and (config["model_type"] == "mistral"
                                         or config.get("use_sliding_window")):
        ablated["sliding_window"] = differs({**config, "sliding_window": None,
                                             "use_sliding_window": False,
                                             "layer_types": None})
    if config["model_type"] == "qwen3":
        llama = {**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
        for key in ("sliding_window", "use_sliding_window", "layer_types", "max_window_layers"):
            llama.pop(key, None)
        ablated["qk_norm"] = differs(llama, strict=False)

    experts = config.get("num_experts") or config.get("num_local_experts")
    if experts:
        ablated["top_k"] = differs({**config, "num_experts_per_tok": experts})
    if config["model_type"] == "qwen3_moe" and config.get("norm_topk_prob"):
        ablated["norm_topk_prob"] = differs({**config, "norm_topk_prob": False})

    json.dump({"logits": logits.tolist(), "greedy": greedy, "ablated": ablated}, sys.stdout)


if __name__ == "__main__":
    main()
