"""Cost of one pass of all 30 layers over a 300-token cache, by rows, precision and matrix kernels
(oneDNN on and off), and of the LM head over one row: what the precision policy is built from.

Usage, from the repository root: python docs/runs/pass_costs.py [bf16,fp32]
Best of 4 per cell, ms. Run it under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 to see a CPU
without native bf16.
"""
import time, torch, sys
from free_cli.decoding.loading import load_engine
from free_cli.decoding.engine import Engine
from free_cli.decoding.config import DecodeConfig
from free_cli.decoding.precision import Precision
torch.set_num_threads(2)
for dt in (sys.argv[1] if len(sys.argv) > 1 else "bf16,fp32").split(","):
    e = load_engine(dtype=dt, device="cpu")
    e = Engine(e.model, e.tokenizer, name=e.name, precision=Precision(e.dtype, e.dtype, onednn_from=None))
    st = e.start(list(range(100, 400)), DecodeConfig(strategy="full"))
    with torch.inference_mode():
        e.feed(st, 30)
        for mk in (True, False):
            torch.backends.mkldnn.enabled = mk
            out = []
            for q in (1, 2, 4, 8, 16, 64):
                x = torch.randn(1, q, 576, dtype=e.dtype)
                best = 1e9
                for r in range(4):
                    t = time.perf_counter(); e.run_layers(st, x, 0, 30, 300); best = min(best, time.perf_counter() - t); e.truncate_cache(st, 300)
                out.append(f"q{q} {best*1000:.1f}")
            hx = torch.randn(1, 1, 576, dtype=e.dtype)
            hb = 1e9
            for r in range(4):
                t = time.perf_counter(); e.adapter.logits(hx); hb = min(hb, time.perf_counter() - t)
            print(dt, "oneDNN" if mk else "ATen", " ".join(out), f"head {hb*1000:.1f}", flush=True)
