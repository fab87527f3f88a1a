"""``tether`` (the console script) and ``python -m tether``.

``tether up HOST`` starts its ssh login first (:mod:`tether._login`); the command line loads
and parses meanwhile, and adopts that login if the target is the one it guessed."""

from __future__ import annotations

import sys

from tether import _login


def main() -> None:
    """The console script's entry point."""
    _login.start(sys.argv[1:])
    try:
        from tether.cli import main as cli_main

        cli_main()
    finally:
        _login.discard()


if __name__ == "__main__":
    main()
