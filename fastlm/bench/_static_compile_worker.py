"""Subprocess worker for the ``hf-static-compile`` provider: HF ``generate`` with a static cache and
a ``torch.compile``d decode step. Runs in its own process so the driver can cap its time (compiling
takes minutes on CPU) and a compile crash cannot take the driver down. Prints ``RESULT {json}``."""
from __future__ import annotations

import json
import sys
import time

import torch


def main(argv) -> int:
    job = json.loads(argv[0])
    from transformers import CompileConfig

    from fastlm.bench import cases as C
    from fastlm.bench.timing import time_once

    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    sizes = C.e2e_sizes(job["scale"], device.type)[job["family"]]
    model = C.build_model(job["family"], sizes, device, dtype)
    cc = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else "default")
    cc._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise

    for batch, prompt, n in job["shapes"]:
        ids = C.random_ids(batch, prompt, sizes["vocab_size"], device)
        mask = torch.ones_like(ids)

        def gen(k):
            with torch.no_grad():
                return model.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                      pad_token_id=0, cache_implementation="static", compile_config=cc)

        t0 = time.perf_counter()
        gen(n)
        compile_s = time.perf_counter() - t0
        gen(1)
        gen(n)
        t1, tn = [], []
        for _ in range(job["reps"]):
            t1.append(time_once(lambda: gen(1), device))
            tn.append(time_once(lambda: gen(n), device))
        print("RESULT " + json.dumps(dict(key=f"{batch}x{prompt}x{n}", t1=t1, tn=tn, compile_s=compile_s)),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
