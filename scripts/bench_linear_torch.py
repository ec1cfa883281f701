"""torch.nn.functional.linear (MKL on x86) at the shapes of benches/cpu_linear.rs, as JSON lines:
the baseline for fpx's CPU linear kernel. Usage: bench_linear_torch.py THREADS."""
import json
import sys
import time

import torch

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
for m, k, n in [(512, 576, 576), (512, 576, 192), (512, 576, 1536), (512, 1536, 576), (512, 576, 49152)]:
    x, w = torch.randn(m, k), torch.randn(n, k)
    torch.nn.functional.linear(x, w)
    reps = max(3, int(2e10 / (2 * m * k * n)))
    t = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    s = (time.perf_counter() - t) / reps
    print(json.dumps({"shape": [m, k, n], "threads": torch.get_num_threads(),
                      "torch_gflops": round(2 * m * k * n / s / 1e9, 1)}))
