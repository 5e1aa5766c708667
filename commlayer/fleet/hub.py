"""The fleet's public host: the c10d TCPStore (membership, ledger) and a relay for peers behind NAT.

    python -m commlayer.fleet.hub --store-port 29400 --relay-port 29401 --front-host rendezvous.example.org

Runs until SIGTERM/SIGINT (or ``--for`` seconds). Prints one JSON line when ready.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from commlayer.fleet.ledger import connect_store
from commlayer.fleet.relay import Relay


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m commlayer.fleet.hub", description=__doc__.splitlines()[0])
    p.add_argument("--bind", default="0.0.0.0", help="address the relay binds (default %(default)s)")
    p.add_argument("--store-port", type=int, required=True)
    p.add_argument("--relay-port", type=int, default=0, help="relay control port (0: no relay)")
    p.add_argument("--front-host", default="127.0.0.1", help="address joiners dial for relayed peers")
    p.add_argument("--for", dest="duration", type=float, default=0.0, help="exit after this many seconds (0: never)")
    a = p.parse_args(argv)
    store = connect_store(f"0.0.0.0:{a.store_port}", 60.0, master=True)
    relay = Relay(a.bind, a.relay_port, a.front_host) if a.relay_port else None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(json.dumps({"event": "ready", "store_port": a.store_port, "relay_port": relay.port if relay else 0}), flush=True)
    try:
        stop.wait(a.duration or None)
    finally:
        if relay is not None:
            print(json.dumps({"event": "relay", "forwarded": relay.forwarded, "sessions": relay.sessions}), flush=True)
            relay.close()
        del store
    return 0


if __name__ == "__main__":
    sys.exit(main())
