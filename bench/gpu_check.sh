#!/usr/bin/env bash
# GPU check for the lent CUDA machine. Installs nothing: it uses the .venv that
# travels with the working tree (carry ".venv"), or python3 with torch already
# present. Prints one table and writes it to $OUT (or bench/results) as JSON.
#
#   bash bench/gpu_check.sh            # 8 subjects of 96x128x128
#   SUBJECTS=20 SHAPE=96,128,128 bash bench/gpu_check.sh
#
# Steps: (1) fp32 and bf16 matmul ceilings; (2) model-only forward, fp32 vs
# bf16 autocast, batch 1 and batch 3, with the flop counter; (3) fp32/bf16
# agreement of the pooled vectors and cosines on phantom subjects (cosine gap
# must stay below BF16_TOL); (4) `cohort run` on CUDA in both pooling modes
# through bench.probe, in fp32 and with --precision bf16; (5) the forward with
# and without depth factorisation (cohort.model.factorise) on cuDNN.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SUBJECTS=${SUBJECTS:-8}
SHAPE=${SHAPE:-96,128,128}
BF16_TOL=${BF16_TOL:-0.02}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true

"$PY" - "$SUBJECTS" "$SHAPE" "$BF16_TOL" "$RESULTS" <<'PYEOF'
import json, math, sys, time
from pathlib import Path

import torch

from bench import core
from bench.run import phantom_cohort, run_probe
from cohort.config import PoolingConfig, PreprocessConfig
from cohort.model.pooling import extract
from cohort.model.network import random_weights
from cohort.execution.driver import cosine_rows
from cohort.inputs.preprocess import air_value

subjects, shape = int(sys.argv[1]), tuple(int(x) for x in sys.argv[2].split(","))
tol, results = float(sys.argv[3]), Path(sys.argv[4])
dev = torch.device("cuda")
torch.backends.cudnn.benchmark = True
report: dict = {"device": torch.cuda.get_device_name(dev), "shape": shape, "subjects": subjects}


def cuda_time(fn, repeats=5):
    fn(); torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter(); fn(); torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


n = 8192
a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
report["ceiling_fp32_tflops"] = 2 * n**3 / cuda_time(lambda: a @ b) / 1e12
ab, bb = a.bfloat16(), b.bfloat16()
report["ceiling_bf16_tflops"] = 2 * n**3 / cuda_time(lambda: ab @ bb) / 1e12
torch.backends.cuda.matmul.allow_tf32 = False

state = random_weights("densenet121", 0).state_dict
ex = core.extractor(state)
ex.network.to(dev)
forward = []
with torch.inference_mode():
    for batch in (1, 3):
        x = torch.randn(batch, 1, *shape, device=dev)
        gflop = 0.0
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc:
            ex(x)
        gflop = fc.get_total_flops() / 1e9
        for precision in ("fp32", "bf16"):
            def step(x=x, precision=precision):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    return ex(x)
            s = cuda_time(step)
            forward.append({"batch": batch, "precision": precision, "s": s, "gflop": gflop,
                            "tflops": gflop / s / 1e3, "mem_gib": torch.cuda.max_memory_allocated() / 2**30})
report["forward"] = forward

manifest = phantom_cohort(results, subjects, shape)
loaded, _ = core.load_all(manifest, PreprocessConfig())
air = air_value(PreprocessConfig())
gaps = {"vector_rel": 0.0, "cosine_abs": 0.0}
with torch.inference_mode():
    for mode in ("masked-pool", "masked-input"):
        cfg = PoolingConfig(mode=mode)
        for s in loaded:
            image, index = s.image.to(dev), s.index.to(dev)
            ref = extract(ex, image, index, s.names, cfg, air)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                low = extract(ex, image, index, s.names, cfg, air)
            scale = max(float(abs(v.vector).max()) for v in ref)
            gaps["vector_rel"] = max(gaps["vector_rel"], max(
                float(abs(x.vector - y.vector).max()) for x, y in zip(ref, low)) / scale)
            for r, l in zip(cosine_rows(ref), cosine_rows(low)):
                gaps["cosine_abs"] = max(gaps["cosine_abs"], abs(r["cosine"] - l["cosine"]))
report["bf16_vs_fp32"] = gaps

plain = core.extractor(state, factorised=False)
plain.network.to(dev)
x = torch.randn(1, 1, *shape, device=dev)
factorisation = {}
with torch.inference_mode():
    for precision in ("fp32", "bf16"):
        for name, model in (("factorised", ex), ("plain 3D", plain)):
            def step(model=model, precision=precision):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    return model(x)
            factorisation[f"{name} {precision}"] = cuda_time(step)
report["factorisation_s"] = factorisation

pipeline = []
for mode in ("masked-pool", "masked-input"):
    for precision in ("fp32", "bf16"):
        probe = run_probe(manifest, mode, results, "random",
                          ["--device", "cuda", "--precision", precision])
        pipeline.append({k: probe[k] for k in ("pooling", "precision", "done", "wall_s",
                                               "steady_per_s", "driver_peak_mib",
                                               "actor_peak_mib")})
report["pipeline"] = pipeline
(results / "gpu_check.json").write_text(json.dumps(report, indent=2))

print(f"{report['device']}: fp32 mm {report['ceiling_fp32_tflops']:.1f} TFLOP/s, "
      f"bf16 mm {report['ceiling_bf16_tflops']:.1f} TFLOP/s")
print(f"{'batch':>5} {'prec':>5} {'s/forward':>10} {'TFLOP/s':>8} {'of ceil':>8} {'GiB':>6}")
for f in forward:
    ceil = report["ceiling_bf16_tflops" if f["precision"] == "bf16" else "ceiling_fp32_tflops"]
    print(f"{f['batch']:>5} {f['precision']:>5} {f['s']:10.4f} {f['tflops']:8.2f} "
          f"{f['tflops'] / ceil:8.1%} {f['mem_gib']:6.2f}")
for name, s in factorisation.items():
    print(f"forward batch 1, {name}: {s:.4f} s")
for p in pipeline:
    print(f"cohort run --pooling {p['pooling']} --precision {p['precision']} --device cuda: "
          f"{p['done']} subjects in "
          f"{p['wall_s']:.1f} s (steady {p['steady_per_s'] or float('nan'):.2f}/s), driver "
          f"{p['driver_peak_mib']:.0f} MiB, actor {p['actor_peak_mib']:.0f} MiB")
print(f"bf16 vs fp32: max rel vector diff {gaps['vector_rel']:.2e}, "
      f"max cosine diff {gaps['cosine_abs']:.2e} (tolerance {tol})")
sys.exit(0 if gaps["cosine_abs"] <= tol else f"bf16 cosines differ by {gaps['cosine_abs']:.3g} > {tol}")
PYEOF
