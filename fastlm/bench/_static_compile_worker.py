"""Subprocess worker for the ``hf-static-compile`` provider: HF ``generate`` with a static cache and
a ``torch.compile``d decode step (fastlm.bench.e2e builds it). Runs in its own process so the driver
can cap its time (compiling takes minutes on CPU) and a compile crash cannot take the driver down.
Prints ``RESULT {json}`` per shape."""
from __future__ import annotations

import json
import sys
import time

import torch


def main(argv) -> int:
    from fastlm.bench.e2e import STATIC_COMPILE, EndToEnd, time_generate

    job = json.loads(argv[0])
    device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
    suite = EndToEnd()
    for case in suite.cases(job["scale"], device):
        if case.family != job["family"] or case.key not in job["shapes"]:
            continue
        generate = suite.build(case, STATIC_COMPILE, device, dtype).generate
        t0 = time.perf_counter()
        generate(case.new_tokens)
        compile_s = time.perf_counter() - t0
        t1, tn = time_generate(generate, case.new_tokens, device, 1, job["reps"])
        print("RESULT " + json.dumps(dict(key="x".join(map(str, case.key)), t1=t1, tn=tn, compile_s=compile_s)),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
