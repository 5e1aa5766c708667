"""commlayer: ZeroMQ communication for distributed training over slow, far-apart links.

Importing this package registers the ``"zmq"`` torch.distributed backend (torch also does this
itself at ``import torch`` through the ``torch.backends`` entry point). When torch is not imported
yet and that entry point will register it, torch is not imported here: helper processes that never
touch torch (the WAN emulator's relays, :mod:`commlayer.testing`) start without a torch import.
"""

from __future__ import annotations

__version__ = "0.1.0"

import sys

from commlayer._autoload import register_backend, torch_will_register

if "torch" in sys.modules or not torch_will_register():
    register_backend()

__all__ = ["__version__", "register_backend"]
