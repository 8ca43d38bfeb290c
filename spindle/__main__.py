"""The ``spindle`` command (and ``python -m spindle``): :mod:`spindle.tools.cli`, with a Ctrl-C
during its imports (which take a few seconds: torch) ending in the same one line as any other."""

import sys


def main() -> int:
    try:
        from spindle.tools.cli import main as cli_main
    except KeyboardInterrupt:
        print("spindle: interrupted", file=sys.stderr)
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
