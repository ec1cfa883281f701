#!/usr/bin/env python3
"""Builds a tiny random model with transformers itself and prints its logits.

Run by the Rust tests (tests/transformers_models.rs) with the interpreter of .venv-ct
(transformers + torch on the CPU); prints one JSON object on stdout.

  hf_tiny.py --config C.json --out DIR --tokens T.json [--new N] [--seed S]
      AutoModelForCausalLM.from_config(AutoConfig.for_model(**C)) in FP32 with torch's
      seed S (no download), saved with save_pretrained(DIR) (safetensors). Prints
        logits     the logits of every position of T (a list of token ids), [len(T), vocab]
        greedy     N tokens of greedy decoding after T (full forward each step, no cache)
        unscaled   largest |logits - logits without rope scaling| / max |logits|: the same
                   weights in a model whose config has no rope scaling (0 when C has none),
                   so a test can tell that the scaling changes the result
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
    model.save_pretrained(args.out)
    logits = logits_of(model, tokens)

    greedy, seq = [], list(tokens)
    for _ in range(args.new):
        nxt = int(logits_of(model, seq)[-1].argmax())
        greedy.append(nxt)
        seq.append(nxt)

    unscaled = 0.0
    if config.get("rope_scaling") or config.get("rope_parameters"):
        plain = dict(config)
        plain.pop("rope_scaling", None)
        plain.pop("rope_parameters", None)
        other = AutoModelForCausalLM.from_config(build(plain), dtype=torch.float32).eval()
        other.load_state_dict(model.state_dict())
        diff = (logits_of(other, tokens) - logits).abs().max()
        unscaled = float(diff / logits.abs().max())

    json.dump({"logits": logits.tolist(), "greedy": greedy, "unscaled": unscaled}, sys.stdout)


if __name__ == "__main__":
    main()
