#!/usr/bin/env python3
"""Markdown summary of an fpx calibration file: sensitivity by layer kind and by depth.

    python3 scripts/calib_summary.py docs/smollm2.calib.json > docs/calibration-summary.md

Reads only the JSON that `fpx calibrate -o` writes (no third-party packages). For each format:
mean eps, eps_wa, weight_error and KL per layer kind (q, k, v, o, gate, up, down) and per
third of the depth, and the ten most KL-sensitive layers.
"""
import json
import sys
from collections import defaultdict


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def main(path):
    c = json.load(open(path))
    layers, formats = c["layers"], c["formats"]
    n_blocks = max(l["layer"] for l in layers) + 1
    kl = c.get("kl")
    print(f"Model `{c['model']['path']}`, {len(layers)} linear layers; {c['text']['tokens']} calibration "
          f"tokens ({c['windows']} x {c['seq_len']}) of `{c['text']['path']}`"
          + (f"; KL on {kl['windows']} held-out window(s) of {kl['seq_len']} tokens." if kl else "."))
    cols = ["eps", "eps_wa", "weight_error", "kl"]
    for group_name, key in (("kind", lambda l: l["kind"]),
                            ("depth", lambda l: f"blocks {3 * l['layer'] // n_blocks * n_blocks // 3}-"
                                                f"{(3 * l['layer'] // n_blocks + 1) * n_blocks // 3 - 1}")):
        print(f"\n### Mean metrics by {group_name}\n")
        print("| " + group_name + " | " + " | ".join(f"{m} {f}" for f in formats for m in cols) + " |")
        print("|---" * (1 + len(formats) * len(cols)) + "|")
        groups = defaultdict(list)
        for l in layers:
            groups[key(l)].append(l)
        order = ["q", "k", "v", "o", "gate", "up", "down"] if group_name == "kind" else sorted(groups)
        for g in order:
            cells = [f"{mean([l['metrics'][f].get(m) for l in groups[g]]):.4g}" for f in formats for m in cols]
            print(f"| {g} | " + " | ".join(cells) + " |")
    if kl:
        print("\n### Ten most sensitive layers (largest KL in any format)\n")
        print("| layer | kind | block | " + " | ".join(f"KL {f}" for f in formats) + " |")
        print("|---|---|---|" + "---|" * len(formats))
        worst = sorted(layers, key=lambda l: -max(l["metrics"][f]["kl"] for f in formats))[:10]
        for l in worst:
            print(f"| {l['name']} | {l['kind']} | {l['layer']} | "
                  + " | ".join(f"{l['metrics'][f]['kl']:.4g}" for f in formats) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
