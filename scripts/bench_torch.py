#!/usr/bin/env python3
"""PyTorch CPU baseline for fpx's CPU benchmark: fp32 eager forward of a Llama GGUF model.

    .venv-bench/bin/python scripts/bench_torch.py --gguf MODEL.gguf (--text FILE | --tokens TOKENS.json) \
        --seq-len N --windows W --threads T [--impl both|plain|transformers] [--attn sdpa|eager] [--batch B]

Two forwards of the same weights, timed side by side in one run (`--impl both`, the default):
`plain`, a Llama forward written directly in torch ops (F.linear, RMSNorm, rotate-half RoPE,
F.scaled_dot_product_attention with is_causal, SiLU-gate; the strongest eager baseline a user
would write), and `transformers`, transformers' LlamaForCausalLM built from a LlamaConfig
taken from the GGUF metadata (`--attn` picks its attention). The GGUF weights are dequantized
to float32 and q/k rows un-permuted (the loader of scripts/reference_ppl.py). Text is tokenized with a `tokenizers` BPE built
from the GGUF's tokenizer.ggml.* metadata (no BOS added). The first W windows of N tokens
are evaluated as in reference_ppl.py (positions 0..N-1 per window, N-1 predictions each).

torch.set_num_threads(T); one untimed warm-up forward of one batch; then the forward of all
windows (B windows per call, default 1) is timed under torch.inference_mode(). Prints:

    {"tokens_per_s": <the faster impl's>, "best": "plain", "threads": T, "seq_len": N,
     "windows": W, "batch": B, "torch": ..., "transformers": ...,
     "impls": {"plain": {"tokens_per_s": W*N/seconds, "seconds": ..., "perplexity": ...},
               "transformers": {..., "attn": "sdpa"}}}

The two perplexities agree to float32 rounding (a check that `plain` is the same model).
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


def plain_forward(m, attn_impl: str = "sdpa"):
    """A Llama forward in plain torch ops over the weights of `m` (reference_ppl.Model):
    returns f(tokens [B, N]) -> logits [B, N, vocab]."""
    import torch
    import torch.nn.functional as F

    t = lambda a: torch.tensor(a)  # noqa: E731  (a copy: the arrays may be read-only)
    H, KV, hd, eps = m.n_head, m.n_kv, m.head_dim, m.eps
    layers = [{k: t(v) for k, v in L.items()} for L in m.layers]
    embed, out_norm = t(m.embed), t(m.out_norm)
    out = t(m.out)
    inv_freq = 1.0 / (m.theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def forward(tokens):
        B, N = tokens.shape
        ang = torch.arange(N, dtype=torch.float64)[:, None] * inv_freq[None, :]
        cos = torch.cat([ang.cos(), ang.cos()], -1).float()
        sin = torch.cat([ang.sin(), ang.sin()], -1).float()

        def rope(x):  # (B, heads, N, hd), pairs (i, i + hd/2)
            a, b = x[..., : hd // 2], x[..., hd // 2:]
            return x * cos + torch.cat([-b, a], -1) * sin

        h = embed[tokens]
        for L in layers:
            x = rms(h, L["attn_norm"])
            q = F.linear(x, L["wq"]).view(B, N, H, hd).transpose(1, 2)
            k = F.linear(x, L["wk"]).view(B, N, KV, hd).transpose(1, 2)
            v = F.linear(x, L["wv"]).view(B, N, KV, hd).transpose(1, 2)
            q, k = rope(q), rope(k)
            if KV != H:
                k = k.repeat_interleave(H // KV, dim=1)
                v = v.repeat_interleave(H // KV, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + F.linear(a.transpose(1, 2).reshape(B, N, H * hd), L["wo"])
            x = rms(h, L["ffn_norm"])
            h = h + F.linear(F.silu(F.linear(x, L["wg"])) * F.linear(x, L["wu"]), L["wd"])
        return F.linear(rms(h, out_norm), out)

    return forward


def timed(forward, batches):
    """Seconds of the forward of every batch (after one untimed warm-up) and the NLL."""
    import torch

    with torch.inference_mode():
        forward(batches[0])  # warm-up, untimed
        seconds = 0.0
        nll = 0.0
        for b in batches:
            t0 = time.perf_counter()
            logits = forward(b)
            seconds += time.perf_counter() - t0
            lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            nll -= lp.gather(-1, b[:, 1:, None]).sum().item()
    return seconds, nll


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
    ap.add_argument("--impl", choices=["both", "plain", "transformers"], default="both",
                    help="which forward to time (default both, side by side)")
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

    batches = [toks[i: i + args.batch] for i in range(0, args.windows, args.batch)]
    n_tok = args.windows * args.seq_len
    n_pred = args.windows * (args.seq_len - 1)
    impls = {}
    # Interleaved in one run: plain, then transformers (same weights, windows, threads).
    if args.impl in ("both", "plain"):
        from reference_ppl import Model

        seconds, nll = timed(plain_forward(Model(args.gguf)), batches)
        impls["plain"] = {"tokens_per_s": n_tok / seconds, "seconds": seconds,
                          "perplexity": math.exp(nll / n_pred), "attn": "sdpa"}
    if args.impl in ("both", "transformers"):
        model, _ = build_model(args.gguf, args.attn)
        forward = lambda b: model(input_ids=b, use_cache=False).logits  # noqa: E731
        seconds, nll = timed(forward, batches)
        impls["transformers"] = {"tokens_per_s": n_tok / seconds, "seconds": seconds,
                                 "perplexity": math.exp(nll / n_pred), "attn": args.attn}
    best = max(impls, key=lambda k: impls[k]["tokens_per_s"])
    print(json.dumps({
        "tokens_per_s": impls[best]["tokens_per_s"],
        "best": best,
        "tokens": n_tok,
        "threads": args.threads,
        "seq_len": args.seq_len,
        "windows": args.windows,
        "batch": args.batch,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "impls": impls,
    }))


if __name__ == "__main__":
    main()
