#!/usr/bin/env python3
"""PyTorch CPU baseline for fpx's CPU benchmark: fp32 eager forward of a Llama GGUF model.

    .venv-bench/bin/python scripts/bench_torch.py --gguf MODEL.gguf (--text FILE | --tokens TOKENS.json) \
        --seq-len N --windows W --threads T [--attn sdpa|eager] [--batch B]

The GGUF weights are dequantized to float32 and q/k rows un-permuted (the loader of
scripts/reference_ppl.py), then loaded into transformers' LlamaForCausalLM built from a
LlamaConfig taken from the GGUF metadata. Text is tokenized with a `tokenizers` BPE built
from the GGUF's tokenizer.ggml.* metadata (no BOS added). The first W windows of N tokens
are evaluated as in reference_ppl.py (positions 0..N-1 per window, N-1 predictions each).

torch.set_num_threads(T); one untimed warm-up forward of one batch; then the forward of all
windows (B windows per call, default 1) is timed under torch.inference_mode(). Prints:

    {"tokens_per_s": W*N/seconds, "seconds": ..., "tokens": W*N, "threads": T,
     "perplexity": ..., "seq_len": N, "windows": W, "batch": B, "attn": ..., "torch": ...,
     "transformers": ...}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402


def die(msg: str) -> "NoReturn":  # noqa: F821
    print(f"bench_torch.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def gguf_tokenizer(path: str):
    """A `tokenizers` BPE equivalent to the GGUF's gpt2-style tokenizer (SmolLM2 'smollm'
    pre-tokenizer: single digits, then GPT-2 byte-level split)."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    r = gguf.GGUFReader(path)
    model = r.fields["tokenizer.ggml.model"].contents()
    if model != "gpt2":
        die(f"tokenizer.ggml.model {model!r} is not supported (only gpt2-style BPE)")
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(toks)}, merges, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    return tk


def build_model(path: str, attn: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from reference_ppl import Model

    m = Model(path)
    tied = m.out is m.embed
    cfg = LlamaConfig(
        vocab_size=m.vocab,
        hidden_size=m.dim,
        intermediate_size=m.layers[0]["wg"].shape[0],
        num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head,
        num_key_value_heads=m.n_kv,
        head_dim=m.head_dim,
        rms_norm_eps=m.eps,
        rope_theta=m.theta,
        max_position_embeddings=8192,
        tie_word_embeddings=tied,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    # Some transformers versions keep RoPE settings in rope_parameters; make sure theta lands.
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        rp["rope_theta"] = m.theta
        rp.setdefault("rope_type", "default")
    cfg._attn_implementation = attn
    # Built on the meta device (no random init), then every weight is assigned below.
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)

    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731  (a copy, writable)
    sd = {
        "model.embed_tokens.weight": t(m.embed),
        "model.norm.weight": t(m.out_norm),
    }
    if not tied:
        sd["lm_head.weight"] = t(m.out)
    for i, L in enumerate(m.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t(L["attn_norm"])
        sd[p + "post_attention_layernorm.weight"] = t(L["ffn_norm"])
        sd[p + "self_attn.q_proj.weight"] = t(L["wq"])
        sd[p + "self_attn.k_proj.weight"] = t(L["wk"])
        sd[p + "self_attn.v_proj.weight"] = t(L["wv"])
        sd[p + "self_attn.o_proj.weight"] = t(L["wo"])
        sd[p + "mlp.gate_proj.weight"] = t(L["wg"])
        sd[p + "mlp.up_proj.weight"] = t(L["wu"])
        sd[p + "mlp.down_proj.weight"] = t(L["wd"])
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if tied:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        die(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    # Non-persistent buffers (RoPE inv_freq) were created on the meta device: rebuild the
    # rotary-embedding modules on the CPU.
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, name, type(child)(cfg))
    bad = [n for n, x in list(model.named_parameters()) + list(model.named_buffers()) if x.is_meta]
    if bad:
        die(f"tensors left on the meta device: {bad[:5]}")
    model.eval()
    return model, m


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="UTF-8 text file, tokenized with the GGUF's tokenizer")
    src.add_argument("--tokens", help="JSON array of token ids")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--windows", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--batch", type=int, default=1, help="windows per forward call (default 1)")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                    help="transformers attention implementation (default sdpa, its default)")
    args = ap.parse_args(argv)
    if args.seq_len < 2 or args.windows < 1 or args.threads < 1 or args.batch < 1:
        die("--seq-len >= 2, --windows >= 1, --threads >= 1, --batch >= 1 required")

    import torch
    import transformers

    torch.set_num_threads(args.threads)

    if args.tokens:
        with open(args.tokens, encoding="utf-8") as f:
            ids = json.load(f)
    else:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
        # Tokenize only as much text as needed (generously: >= 1 char per token).
        need = args.seq_len * args.windows
        ids = gguf_tokenizer(args.gguf).encode(text[: need * 8]).ids
        if len(ids) < need:
            ids = gguf_tokenizer(args.gguf).encode(text).ids
    if len(ids) < args.seq_len * args.windows:
        die(f"{len(ids)} tokens do not fill {args.windows} windows of {args.seq_len}")
    toks = torch.tensor(ids[: args.seq_len * args.windows], dtype=torch.long).view(args.windows, args.seq_len)

    model, _ = build_model(args.gguf, args.attn)

    batches = [toks[i: i + args.batch] for i in range(0, args.windows, args.batch)]
    with torch.inference_mode():
        model(input_ids=batches[0], use_cache=False)  # warm-up, untimed
        seconds = 0.0
        nll = 0.0
        for b in batches:
            t0 = time.perf_counter()
            logits = model(input_ids=b, use_cache=False).logits
            seconds += time.perf_counter() - t0
            lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            nll -= lp.gather(-1, b[:, 1:, None]).sum().item()
    n_tok = args.windows * args.seq_len
    n_pred = args.windows * (args.seq_len - 1)
    print(json.dumps({
        "tokens_per_s": n_tok / seconds,
        "seconds": seconds,
        "tokens": n_tok,
        "threads": args.threads,
        "perplexity": math.exp(nll / n_pred),
        "seq_len": args.seq_len,
        "windows": args.windows,
        "batch": args.batch,
        "attn": args.attn,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }))


if __name__ == "__main__":
    main()
