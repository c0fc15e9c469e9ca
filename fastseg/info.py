"""``python -m fastseg.info``: what fastseg was built for and which backends can run here."""

from __future__ import annotations

import json
import platform

import torch

from fastseg import _extension, ops

__all__ = ["collect", "main"]


def collect() -> dict:
    """Build metadata, the running environment, and each op's backends (usable, and why not)."""
    return {
        "build": _extension.build_info(),
        "extension_loaded": _extension.has_ops(),
        "load_error": _extension.load_error(),
        "runtime": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(),
        },
        "available_backends": ops.available_backends(),
        "backend_status": ops.backend_status(),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="fastseg.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    b = info["build"]
    print(f"fastseg {b.get('version', '?')}  built for torch {b.get('torch', '?')}, "
          f"CUDA {b.get('cuda') or 'none'} (archs {b.get('cuda_archs') or '-'}), "
          f"compiled backends: {', '.join(b.get('compiled_backends', [])) or 'none'}")
    if info["load_error"]:
        print(f"fastseg._C not loaded: {info['load_error']}")
    r = info["runtime"]
    print(f"running torch {r['torch']}, python {r['python']}, {r['threads']} threads, GPU: {r['gpu'] or 'none'}")
    for op, status in info["backend_status"].items():
        print(f"{op}: usable {info['available_backends'][op]}")
        for backend, why in status.items():
            print(f"  {backend:<10} {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
