#!/usr/bin/env python3
"""Checks an `fpx export` directory with compressed-tensors' and transformers' own code.

Run by the Rust tests (tests/export_ct.rs) with the interpreter of .venv-ct
(scripts/setup-ct.sh); prints one JSON object on stdout.

  ct_check.py compare --export DIR --weights W.safetensors
      W holds, per checked linear layer L, `L.source` (the FP32 weight fpx quantized) and
      `L.fpx` (fpx's dequantization of its quantized bytes). For each layer of DIR's
      quantization_config found in W:
        * decompression: compressed-tensors' compressor for the group's format decompresses
          DIR's tensors; compared with `L.fpx` rounded to the dtype it decompresses to;
        * quantizer: compressed-tensors' scale rules (calculate_qparams / generate_gparam, as
          its min-max observer feeds them) and the compressor's compress() applied to
          `L.source`; its tensors compared byte for byte with DIR's.
  ct_check.py ppl --model DIR --tokens T.json --seq-len N
      transformers' AutoModelForCausalLM.from_pretrained(DIR) in FP32 on the CPU (the
      compressed-tensors integration decompresses it); perplexity over the windows of N
      tokens in T.json (as `fpx eval --save-tokens` writes them; each window predicts its
      tokens 1..N-1, as fpx eval does).
      Mixture-of-experts models (Qwen3-MoE, Mixtral): transformers 5 fuses a block's experts
      into 3-D parameters, which its compressed-tensors integration cannot target (it matches
      nn.Linear modules by name). Those exports are decompressed layer by layer with
      compressed-tensors' own compressors (as `compare` does), written as a dense checkpoint,
      and loaded by from_pretrained, whose conversion fuses the per-expert tensors; vLLM and
      SGLang load the per-expert layout fpx writes as it is.
"""

import argparse
import json
import math
import os
import re
import sys

import torch
from safetensors import safe_open


def load_export(path):
    """All tensors of an exported directory, by name (via its shard index)."""
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(os.path.join(path, shard), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def schemes(path):
    """layer name -> (QuantizationScheme, format) from the export's quantization_config."""
    from compressed_tensors.quantization import QuantizationConfig

    with open(os.path.join(path, "config.json")) as f:
        qc = QuantizationConfig.model_validate(json.load(f)["quantization_config"])
    out = {}
    for scheme in qc.config_groups.values():
        for t in scheme.targets:
            out[t] = scheme
    # Targets that name no tensor: the aliases vLLM's MoE scheme lookup needs for Mixtral.
    tensors = set(json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"])
    return {t: s for t, s in out.items() if any(k.startswith(t + ".") for k in tensors)}


FUSED = re.compile(r"(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj|w1|w3)$")


def fused_group(layer):
    """The matrix vLLM and SGLang fuse `layer` into (q/k/v -> qkv_proj, gate/up -> gate_up_proj
    or an expert's w13), or None."""
    m = FUSED.fullmatch(layer)
    if m is None:
        return None
    return m.group(1) + (".qkv" if m.group(2) in ("q_proj", "k_proj", "v_proj") else ".gate_up")


def ct_quantize(weight, scheme, group_weights=()):
    """compressed-tensors' quantization of an FP32 weight under `scheme`: the min-max
    observer's statistics through its own qparam rules, then the compressor's compress().
    NVFP4 members of a fused group take the group's global scale, as llm-compressor's
    update_fused_layer_weight_global_scales sets it (the smallest gparam of the members, i.e.
    the one of their largest magnitude); `group_weights` are the other members' weights."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.quant_args import QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    args = scheme.weights
    sd = {"weight": weight}
    global_scale = None
    if args.strategy == QuantizationStrategy.CHANNEL:
        lo, hi = weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    else:
        groups = weight.unflatten(-1, (weight.shape[-1] // args.group_size, args.group_size))
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        if args.strategy == QuantizationStrategy.TENSOR_GROUP:
            members = [weight, *group_weights]
            global_scale = generate_gparam(min(m.amin() for m in members),
                                           max(m.amax() for m in members))
            sd["weight_global_scale"] = global_scale
    scale, _ = calculate_qparams(lo, hi, args, global_scale=global_scale)
    sd["weight_scale"] = scale
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    return compressor.compress(sd, scheme)


def ct_decompress(tensors, layer, scheme):
    from compressed_tensors.compressors import BaseCompressor

    prefix = layer + "."
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    sd.pop("bias", None)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    return compressor.decompress(sd, scheme)["weight"]


def compare(args):
    tensors = load_export(args.export)
    by_layer = schemes(args.export)
    layers = []
    # vLLM and SGLang keep one global scale per fused NVFP4 matrix: its members must agree.
    globals_by_group = {}
    for layer, scheme in by_layer.items():
        g = fused_group(layer)
        if g is not None and scheme.format == "nvfp4-pack-quantized":
            globals_by_group.setdefault(g, set()).add(
                bytes(tensors[layer + ".weight_global_scale"].contiguous().view(torch.uint8).tolist()))
    fused_differ = sorted(g for g, v in globals_by_group.items() if len(v) > 1)
    with safe_open(args.weights, framework="pt") as w:
        names = set(w.keys())
        nvfp4_source = {
            l: w.get_tensor(l + ".source") for l, sc in by_layer.items()
            if sc.format == "nvfp4-pack-quantized" and l + ".source" in names
        }
        for layer, scheme in sorted(by_layer.items()):
            if layer + ".source" not in names:
                continue
            source = w.get_tensor(layer + ".source")
            fpx = w.get_tensor(layer + ".fpx")
            dec = ct_decompress(tensors, layer, scheme)
            want = fpx.to(dec.dtype)
            diff = (dec.float() - want.float()).abs()
            ulp = want.float().abs() * (2.0 ** -7 if dec.dtype == torch.bfloat16 else 2.0 ** -23)
            group = fused_group(layer)
            peers = [t for l, t in nvfp4_source.items()
                     if l != layer and group is not None and fused_group(l) == group]
            ours = ct_quantize(source, scheme, peers if layer in nvfp4_source else ())
            byte_diffs = {}
            for k, v in ours.items():
                mine = tensors[f"{layer}.{k}"]
                a = v.contiguous().view(torch.uint8).flatten()
                b = mine.contiguous().view(torch.uint8).flatten()
                byte_diffs[k] = int((a != b).sum()) if a.shape == b.shape else -1
            layers.append({
                "layer": layer,
                "format": scheme.format,
                "decompressed_dtype": str(dec.dtype).replace("torch.", ""),
                "elements": dec.numel(),
                "decompress_mismatches": int((diff > 0).sum()),
                "decompress_beyond_one_ulp": int((diff > ulp).sum()),
                "decompress_max_abs": float(diff.max()),
                "quantizer_byte_mismatches": byte_diffs,
                "tensor_bytes": {k: v.numel() * v.element_size() for k, v in ours.items()},
            })
    json.dump({"layers": layers, "fused_nvfp4_global_scales_differ": fused_differ}, sys.stdout)


def is_moe(path):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    return bool(config.get("num_experts") or config.get("num_local_experts"))


def decompressed_moe(path, out):
    """The export at `path` as a dense FP32 checkpoint in `out`: every quantized layer through
    compressed-tensors' decompression, every other tensor as stored."""
    from safetensors.torch import save_file

    tensors = load_export(path)
    dense = {}
    quantized = schemes(path)
    for layer, scheme in quantized.items():
        dense[layer + ".weight"] = ct_decompress(tensors, layer, scheme).float()
    for k, v in tensors.items():
        layer = k.rsplit(".", 1)[0]
        if layer not in quantized or k.endswith(".bias"):
            dense[k] = v.float()
    save_file({k: v.contiguous() for k, v in dense.items()}, os.path.join(out, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config")
    config["torch_dtype"] = "float32"
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    return len(quantized)


def ppl(args):
    import tempfile

    from transformers import AutoModelForCausalLM

    if is_moe(args.model):
        with tempfile.TemporaryDirectory() as dense:
            decompressed = decompressed_moe(args.model, dense)
            model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
        quantized = decompressed > 0
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        quantized = bool(getattr(model.config, "quantization_config", None))
    if getattr(model, "hf_quantizer", None) is not None:
        # The integration decompresses on the first forward (a pre-hook); compressed-tensors'
        # FP4 decompression yields bfloat16 weights, which an FP32 model cannot multiply.
        # Decompress now with the same compressor, then compute in FP32 like fpx eval.
        model.hf_quantizer.compressor.decompress_model(model)
        for p in model.parameters():
            p.data = p.data.float()
    model.eval()
    with open(args.tokens) as f:
        tokens = json.load(f)
    # `fpx eval --save-tokens` writes the evaluated windows back to back.
    n = args.seq_len
    windows = [tokens[i:i + n] for i in range(0, len(tokens) - n + 1, n)]
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logits = model(ids).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
            count += len(w) - 1
    weights = {type(m.weight).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)}
    json.dump({"ppl": math.exp(nll / count), "tokens": count,
               "quantized": quantized,
               "linear_weight_types": sorted(weights)}, sys.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--export", required=True)
    c.add_argument("--weights", required=True)
    q = sub.add_parser("ppl")
    q.add_argument("--model", required=True)
    q.add_argument("--tokens", required=True)
    q.add_argument("--seq-len", type=int, required=True)
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("FPX_THREADS", "2")))
    {"compare": compare, "ppl": ppl}[a.cmd](a)


if __name__ == "__main__":
    main()
