#!/usr/bin/env python3
"""Independent reference perplexity of a Llama-architecture GGUF model, in plain numpy.

Used by fpx's integration tests to check fpx's own forward pass. Nothing here shares code
with fpx: weights come from the `gguf` package (GGUFReader + gguf.quants.dequantize), the
forward is written out from the Hugging Face Llama definition.

    python scripts/reference_ppl.py --gguf MODEL.gguf --tokens TOKENS.json --seq-len N [--windows W]

TOKENS.json is a JSON array of token ids. The tokens are cut into non-overlapping windows of
N tokens starting at token 0; windows = min(W, len(tokens) // N) (all of them without
--windows). Within each window the model sees positions 0..N-1 (no BOS is added) and
predicts tokens 1..N-1 from the ones before them, so each window contributes N-1
predictions. Prints one JSON object:

    {"perplexity": exp(nll_sum / tokens), "tokens": <predictions>, "nll_sum": <sum of -log p>}

Numerics: weights are dequantized to float32; matrix products run in float32; RMSNorm,
softmax and log-softmax are computed in float64.

The forward (HF LlamaForCausalLM semantics):
  h = embed[tokens]
  per layer:  x = rmsnorm(h) * attn_norm
              q, k, v = x Wq^T, x Wk^T, x Wv^T        (q/k rows un-permuted, see below)
              RoPE, "rotate_half" convention: dims (i, i + head_dim/2) form a pair,
                  angle = pos * theta^(-2i/head_dim)
              causal softmax attention, GQA: query head h reads kv head h // (n_head/n_kv)
              h += attn Wo^T
              x = rmsnorm(h) * ffn_norm
              h += (silu(x Wg^T) * (x Wu^T)) Wd^T
  logits = rmsnorm(h) * output_norm @ W_out^T    (W_out = token_embd when output.weight is absent)
  rmsnorm(x) = x / sqrt(mean(x^2) + eps)

llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) stores q_proj/k_proj
with the rows of each head reordered so that its interleaved ("NORM") RoPE, which rotates
adjacent pairs (2i, 2i+1), matches HF's rotate_half on the original rows:
    gguf = hf.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(rows, cols)
i.e. gguf row h*hd + 2i + j  ==  hf row h*hd + j*hd/2 + i. The inverse used here is
    hf = gguf.reshape(n_head, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
with n_head = head_count for q and head_count_kv for k. (`--self-check` verifies the
direction: the interleaved RoPE on the stored rows must give the same logits.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

try:
    import gguf
    from gguf import quants as gguf_quants
except ImportError as e:  # pragma: no cover
    sys.exit(f"reference_ppl.py: the `gguf` package is required ({e}); run scripts/setup-tools.sh")


def die(msg: str) -> "NoReturn":  # noqa: F821
    print(f"reference_ppl.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def _field(reader: "gguf.GGUFReader", key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (inverse of convert_hf_to_gguf.py's permute)."""
    rows, cols = w.shape
    if rows % (2 * n_head):
        die(f"cannot un-permute a {rows}x{cols} projection over {n_head} heads")
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
    )


class Model:
    def __init__(self, path: str, unpermute: bool = True):
        try:
            reader = gguf.GGUFReader(path)
        except (OSError, ValueError) as e:
            die(f"cannot read GGUF {path}: {e}")
        arch = _field(reader, "general.architecture")
        if arch != "llama":
            die(f"{path}: general.architecture is {arch!r}; only 'llama' is supported")
        p = "llama."
        self.n_layer = int(_field(reader, p + "block_count"))
        self.dim = int(_field(reader, p + "embedding_length"))
        self.n_head = int(_field(reader, p + "attention.head_count"))
        self.n_kv = int(_field(reader, p + "attention.head_count_kv", self.n_head))
        self.head_dim = int(_field(reader, p + "attention.key_length", self.dim // self.n_head))
        self.eps = float(_field(reader, p + "attention.layer_norm_rms_epsilon"))
        self.theta = float(_field(reader, p + "rope.freq_base", 10000.0))
        rope_dims = int(_field(reader, p + "rope.dimension_count", self.head_dim))
        if rope_dims != self.head_dim:
            die(f"partial RoPE (rope.dimension_count={rope_dims}, head_dim={self.head_dim}) is not supported")
        scaling = _field(reader, p + "rope.scaling.type")
        if scaling not in (None, "none"):
            die(f"RoPE scaling {scaling!r} is not supported")
        if self.n_head % self.n_kv:
            die(f"head_count {self.n_head} is not a multiple of head_count_kv {self.n_kv}")

        tensors = {t.name: t for t in reader.tensors}
        if "rope_freqs.weight" in tensors:
            die("rope_freqs.weight (Llama 3 RoPE scaling) is not supported")

        def get(name: str) -> np.ndarray:
            t = tensors.get(name)
            if t is None:
                die(f"{path}: tensor {name} is missing")
            w = gguf_quants.dequantize(t.data, t.tensor_type)
            # GGUF shapes list ne0 (the contiguous dim) first; numpy arrays are row-major.
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            return np.ascontiguousarray(w.reshape(shape), dtype=np.float32)

        self.embed = get("token_embd.weight")  # (vocab, dim)
        self.vocab = self.embed.shape[0]
        self.out = get("output.weight") if "output.weight" in tensors else self.embed
        self.out_norm = get("output_norm.weight")
        self.layers = []
        hd = self.head_dim
        for i in range(self.n_layer):
            b = f"blk.{i}."
            wq = get(b + "attn_q.weight")
            wk = get(b + "attn_k.weight")
            if unpermute:
                wq = unpermute_rows(wq, self.n_head)
                wk = unpermute_rows(wk, self.n_kv)
            layer = dict(
                attn_norm=get(b + "attn_norm.weight"),
                wq=wq,
                wk=wk,
                wv=get(b + "attn_v.weight"),
                wo=get(b + "attn_output.weight"),
                ffn_norm=get(b + "ffn_norm.weight"),
                wg=get(b + "ffn_gate.weight"),
                wu=get(b + "ffn_up.weight"),
                wd=get(b + "ffn_down.weight"),
            )
            assert layer["wq"].shape == (self.n_head * hd, self.dim), layer["wq"].shape
            assert layer["wk"].shape == (self.n_kv * hd, self.dim), layer["wk"].shape
            assert layer["wv"].shape == (self.n_kv * hd, self.dim), layer["wv"].shape
            self.layers.append(layer)


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    r = 1.0 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    return (x64 * r * w).astype(np.float32)


def rope_tables(n: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    half = head_dim // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim)  # (half,)
    ang = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None, :]  # (n, half)
    return np.cos(ang), np.sin(ang)


def rope_rotate_half(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: (heads, n, head_dim); pairs (i, i + head_dim/2)."""
    half = x.shape[-1] // 2
    x64 = x.astype(np.float64)
    a, b = x64[..., :half], x64[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(np.float32)


def rope_interleaved(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """llama.cpp's NORM RoPE: pairs (2i, 2i+1). Only for --self-check on permuted weights."""
    x64 = x.astype(np.float64)
    a, b = x64[..., 0::2], x64[..., 1::2]
    out = np.empty_like(x64)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = b * cos + a * sin
    return out.astype(np.float32)


def forward(m: Model, tokens: np.ndarray, interleaved_rope: bool = False) -> np.ndarray:
    """Logits (n, vocab) float32 for one sequence at positions 0..n-1."""
    n = tokens.shape[0]
    hd, H, KV = m.head_dim, m.n_head, m.n_kv
    group = H // KV
    cos, sin = rope_tables(n, hd, m.theta)
    rope = rope_interleaved if interleaved_rope else rope_rotate_half
    mask = np.triu(np.full((n, n), -np.inf), k=1)  # (n, n), float64
    scale = 1.0 / math.sqrt(hd)

    h = m.embed[tokens].astype(np.float32)  # (n, dim)
    for L in m.layers:
        x = rmsnorm(h, L["attn_norm"], m.eps)
        q = (x @ L["wq"].T).reshape(n, H, hd).transpose(1, 0, 2)  # (H, n, hd)
        k = (x @ L["wk"].T).reshape(n, KV, hd).transpose(1, 0, 2)  # (KV, n, hd)
        v = (x @ L["wv"].T).reshape(n, KV, hd).transpose(1, 0, 2)
        q = rope(q, cos, sin)
        k = rope(k, cos, sin)
        # GQA: query head j uses kv head j // group.
        k = np.repeat(k, group, axis=0)  # (H, n, hd)
        v = np.repeat(v, group, axis=0)
        s = (q @ k.transpose(0, 2, 1)).astype(np.float64) * scale + mask  # (H, n, n)
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        o = (p.astype(np.float32) @ v).transpose(1, 0, 2).reshape(n, H * hd)  # (n, dim)
        h = h + o @ L["wo"].T
        x = rmsnorm(h, L["ffn_norm"], m.eps)
        g = x @ L["wg"].T
        u = x @ L["wu"].T
        a = (g / (1.0 + np.exp(-g.astype(np.float64)))).astype(np.float32) * u
        h = h + a @ L["wd"].T
    x = rmsnorm(h, m.out_norm, m.eps)
    return x @ m.out.T  # (n, vocab)


def window_nll(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Sum of -log p(tokens[t+1] | tokens[..t]) for t = 0..n-2."""
    z = logits[:-1].astype(np.float64)
    zmax = z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(axis=-1)) + zmax[:, 0]
    tgt = z[np.arange(z.shape[0]), tokens[1:]]
    return float(np.sum(lse - tgt))


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def load_tokens(path: str, vocab: int) -> np.ndarray:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        die(f"cannot read tokens from {path}: {e}")
    if not isinstance(data, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in data):
        die(f"{path}: expected a JSON array of integer token ids")
    toks = np.asarray(data, dtype=np.int64)
    if toks.size and (toks.min() < 0 or toks.max() >= vocab):
        die(f"{path}: token id out of range [0, {vocab})")
    return toks


def self_check(m: Model, path: str, tokens: np.ndarray) -> None:
    """The interleaved RoPE on the stored (permuted) rows must equal rotate_half on the
    un-permuted rows; a wrong un-permutation direction breaks this."""
    raw = Model(path, unpermute=False)
    n = min(32, tokens.shape[0])
    a = forward(m, tokens[:n])
    b = forward(raw, tokens[:n], interleaved_rope=True)
    c = forward(raw, tokens[:n], interleaved_rope=False)
    err = float(np.max(np.abs(a - b)))
    wrong = float(np.max(np.abs(a - c)))
    print(json.dumps({"self_check_max_abs_diff": err, "without_unpermute_max_abs_diff": wrong}),
          file=sys.stderr)
    if not err < 1e-2 * max(1.0, float(np.max(np.abs(a)))):
        die(f"self-check failed: max |logit difference| {err}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="Llama-architecture GGUF model")
    ap.add_argument("--tokens", required=True, help="JSON array of token ids")
    ap.add_argument("--seq-len", type=int, required=True, help="window length N (>= 2)")
    ap.add_argument("--windows", type=int, default=None, help="at most this many windows (default: all)")
    ap.add_argument("--self-check", action="store_true",
                    help="also verify the q/k un-permutation against llama.cpp's interleaved RoPE (stderr)")
    args = ap.parse_args(argv)

    if args.seq_len < 2:
        die("--seq-len must be at least 2")
    if args.windows is not None and args.windows < 1:
        die("--windows must be at least 1")

    m = Model(args.gguf)
    tokens = load_tokens(args.tokens, m.vocab)
    n_win = len(tokens) // args.seq_len
    if args.windows is not None:
        n_win = min(n_win, args.windows)
    if n_win == 0:
        die(f"{len(tokens)} tokens do not fill one window of {args.seq_len}")
    if args.self_check:
        self_check(m, args.gguf, tokens)

    nll_sum = 0.0
    count = 0
    for w in range(n_win):
        win = tokens[w * args.seq_len:(w + 1) * args.seq_len]
        nll_sum += window_nll(forward(m, win), win)
        count += args.seq_len - 1
    print(json.dumps({"perplexity": math.exp(nll_sum / count), "tokens": count, "nll_sum": nll_sum}))


if __name__ == "__main__":
    main()
