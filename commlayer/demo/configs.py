"""Training configurations compared by the demo and the time-to-accuracy benchmark.

A configuration string is ``BACKEND:METHOD[:ARG]``:

* ``gloo:dense`` / ``zmq:dense``: DDP, plain gradient all-reduce on that backend's group.
* ``gloo:torch-powersgd:R``: DDP over gloo with torch's own PowerSGD hook, rank ``R``.
* ``gloo:hook:SPEC`` / ``zmq:hook:SPEC``: DDP with commlayer's codec hook (any codec spec).
* ``gloo:local:H`` / ``zmq:local:H``: local SGD, parameters averaged every ``H`` steps.
* ``gloo:diloco:H`` / ``zmq:diloco:H``: DiLoCo (outer Nesterov, lr 0.7, momentum 0.9) every ``H`` steps.
* ``zmq:local:H@SPEC`` / ``zmq:diloco:H@SPEC``: the same, with the synchronisation all-reduce
  compressed by the zmq backend's codec ``SPEC`` (``COMMLAYER_CODEC`` semantics, e.g. ``int8+ef``).
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("gloo", "zmq")
METHODS = ("dense", "torch-powersgd", "hook", "local", "diloco")


@dataclass(frozen=True)
class RunConfig:
    """One parsed configuration string (see the module docstring)."""

    backend: str
    method: str
    arg: str = ""

    @property
    def name(self) -> str:
        return f"{self.backend}:{self.method}" + (f":{self.arg}" if self.arg else "")

    @property
    def period(self) -> int:
        """Steps between synchronizations (1 for DDP methods)."""
        return int(self.arg.split("@", 1)[0]) if self.method in ("local", "diloco") else 1

    @property
    def codec(self) -> str:
        """The backend codec of the synchronisation all-reduce ("" = exact)."""
        return self.arg.split("@", 1)[1] if self.method in ("local", "diloco") and "@" in self.arg else ""

    def label(self) -> str:
        """Human-readable description for tables."""
        b = "commlayer zmq" if self.backend == "zmq" else "gloo"
        if self.method == "dense":
            return f"{b}, dense DDP"
        if self.method == "torch-powersgd":
            return f"{b} + torch PowerSGD hook (rank {self.arg})"
        if self.method == "hook":
            return f"{b} + commlayer hook {self.arg}"
        codec = f", sync via {self.codec}" if self.codec else ""
        return f"{b} + {'local SGD' if self.method == 'local' else 'DiLoCo'} H={self.period}{codec}"


def parse_config(text: str) -> RunConfig:
    """Parses ``BACKEND:METHOD[:ARG]``; raises ValueError naming the valid forms."""
    parts = text.strip().split(":", 2)
    if len(parts) < 2 or parts[0] not in BACKENDS or parts[1] not in METHODS:
        raise ValueError(f"config {text!r}: expected BACKEND:METHOD[:ARG] with BACKEND in {BACKENDS} and METHOD in "
                         f"{METHODS}, e.g. 'gloo:dense', 'gloo:torch-powersgd:2', 'zmq:hook:powersgd:rank=2', 'zmq:local:8'")
    backend, method = parts[0], parts[1]
    arg = parts[2] if len(parts) == 3 else ""
    if method == "torch-powersgd":
        arg = arg or "2"
        if backend != "gloo" and backend != "zmq":
            raise ValueError(f"config {text!r}: unknown backend")
    if method in ("local", "diloco") and "@" in arg:
        if backend != "zmq":
            raise ValueError(f"config {text!r}: a sync codec ('@SPEC') needs the zmq backend")
        from commlayer.codecs import from_spec

        from_spec(arg.split("@", 1)[1])  # raises a SpecError naming the bad token
    if method in ("torch-powersgd", "local", "diloco"):
        if not arg.split("@", 1)[0].isdigit() or int(arg.split("@", 1)[0]) < 1:
            raise ValueError(f"config {text!r}: expected a positive integer after '{method}:', got {arg!r}")
    if method == "hook" and not arg:
        raise ValueError(f"config {text!r}: expected a codec spec after 'hook:', e.g. 'zmq:hook:topk:ratio=0.01+ef'")
    if method == "dense" and arg:
        raise ValueError(f"config {text!r}: 'dense' takes no argument")
    return RunConfig(backend, method, arg)
