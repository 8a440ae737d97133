"""``python -m fastlm info`` / ``fastlm info``: versions, device, and each backend's availability."""
from __future__ import annotations

import platform


def info_lines() -> list[str]:
    from fastlm.cli import import_torch

    torch = import_torch()
    import transformers

    import fastlm
    from fastlm.ops._registry import BACKENDS, backend_status, resolve

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    lines = [
        f"fastlm        {fastlm.__version__}",
        f"python        {platform.python_version()}",
        f"torch         {torch.__version__} (CUDA {'available' if cuda else 'not available'})",
        f"transformers  {transformers.__version__}",
        f"device        {device}",
        "backends:",
    ]
    device_types = ["cpu"] + (["cuda"] if cuda else [])
    for backend in BACKENDS:
        for dt in device_types:
            ok, why = backend_status(backend, dt)
            lines.append(f"  {backend:<7} {dt:<5} {'available  ' if ok else 'unavailable'}  {why}")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dt in device_types:
            lines.append(f"auto on {dt}: {resolve('auto', dt)}")
    return lines


def main(argv=None) -> int:
    from fastlm.cli import ArgumentParser

    ArgumentParser(prog="fastlm info", description="versions, device and each backend's availability"
                   ).parse_args(argv)  # no options but --help
    print("\n".join(info_lines()))
    return 0
