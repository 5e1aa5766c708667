"""commlayer: ZeroMQ communication for distributed training over slow, far-apart links.

Importing this package registers the ``"zmq"`` torch.distributed backend (torch also does this
itself at ``import torch`` through the ``torch.backends`` entry point).
"""

from __future__ import annotations

__version__ = "0.1.0"

from commlayer._autoload import register_backend

register_backend()

__all__ = ["__version__", "register_backend"]
