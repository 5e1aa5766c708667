"""Entry point of helper processes: ``python -m commlayer.wan._child relay|tunfwd FD``.

Kept apart from the modules it runs so that ``-m`` never re-executes an imported module.
"""

from __future__ import annotations

import sys
from multiprocessing.connection import Connection


def main() -> None:
    """Receives the payload on the inherited connection and runs the named service."""
    conn = Connection(int(sys.argv[2]))
    payload = conn.recv()
    if sys.argv[1] == "relay":
        from commlayer.wan.relay import _serve

        _serve(*payload, conn=conn)  # type: ignore[misc]
    elif sys.argv[1] == "tunfwd":
        from commlayer.wan.tunfwd import forward

        try:
            forward(*payload, conn=conn)  # type: ignore[misc]
        finally:
            try:
                conn.send(("stopped", None))
            except OSError:
                pass
    else:
        raise SystemExit(f"unknown service {sys.argv[1]!r}")


if __name__ == "__main__":
    main()
