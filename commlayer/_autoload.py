"""Registration of the ``zmq`` backend with torch.distributed.

This module is the target of the ``torch.backends`` entry point, which torch loads while
``import torch`` is still running. It therefore imports nothing heavy at module level and never
lets an exception escape: a broken install must not break ``import torch``.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

BACKEND_NAME = "zmq"
_registered = False


def _create(dist_backend_opts, backend_options):  # noqa: ANN001 - torch passes its own types
    from commlayer.backend.process_group import create_process_group

    return create_process_group(dist_backend_opts, backend_options)


def register_backend() -> bool:
    """Registers ``zmq`` with torch.distributed once per process.

    Returns:
        True if the backend is registered (now or before), False if torch.distributed is
        unavailable or registration failed (the reason is logged).
    """
    global _registered
    if _registered:
        return True
    try:
        import torch.distributed as dist

        if not dist.is_available():
            logger.warning("torch.distributed is not available; the zmq backend is not registered")
            return False
        dist.Backend.register_backend(BACKEND_NAME, _create, extended_api=True, devices=["cpu"])
        _registered = True
    except Exception as exc:  # pragma: no cover - defensive: must never break `import torch`
        logger.warning("could not register the zmq torch.distributed backend: %r", exc)
        return False
    return True


def torch_will_register() -> bool:
    """True when a later ``import torch`` registers ``zmq`` itself (entry point installed, torch's autoload on)."""
    if os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD", "1") != "1":  # torch's own switch (torch/__init__.py)
        return False
    try:
        from importlib.metadata import entry_points

        return any(ep.value == f"{__name__}:autoload" for ep in entry_points(group="torch.backends"))
    except Exception:  # pragma: no cover - defensive: then register eagerly
        return False


def autoload() -> None:
    """Entry point called by torch at import time; never raises."""
    try:
        register_backend()
    except BaseException as exc:  # pragma: no cover - defensive
        logger.warning("commlayer autoload failed: %r", exc)
