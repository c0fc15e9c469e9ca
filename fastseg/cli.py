"""The ``fastseg`` console script: ``fastseg info`` and ``fastseg bench ...``."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fastseg {info,bench} [options]   (see `fastseg <command> --help`)")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "info":
        from fastseg.info import main as run
    elif command == "bench":
        from fastseg.bench import main as run
    else:
        print(f"fastseg: unknown command {command!r}; expected info or bench", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    raise SystemExit(main())
