"""Tensors outside host memory (CUDA) through host staging buffers.

Design: before an operation is issued, every argument tensor not in CPU memory is copied into a
fresh host tensor (pinned when CUDA is available, so the copies can use DMA); the CPU operation
runs on the host tensors; when it completes, the host copies of its *output* tensors are copied
back into the original tensors, and only then does the returned Work complete (``wait()`` and
``get_future()`` see the device tensors already updated). An error of the operation, or of the
copy back, fails the Work.

Status: the logic is tested on CPU (``tests/test_backend_staging.py`` stages CPU tensors through
the same path); it has **not been run on a GPU**. Copies use the current CUDA stream of the
issuing thread (host copy, synchronous) and of the executor thread (copy back, synchronous).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from commlayer.backend.work import ZmqWork

logger = logging.getLogger(__name__)

Predicate = Callable[[torch.Tensor], bool]


def off_host(t: torch.Tensor) -> bool:
    """The default staging rule: the tensor's memory is not host memory."""
    return t.device.type != "cpu"


def _any(obj: Any, pred: Predicate) -> bool:
    if isinstance(obj, torch.Tensor):
        return pred(obj)
    if isinstance(obj, (list, tuple)):
        return any(_any(o, pred) for o in obj)
    return False


def needs_staging(args: tuple[Any, ...], pred: Predicate = off_host) -> bool:
    return _any(args, pred)


class _Stager:
    def __init__(self, pred: Predicate) -> None:
        self.pred = pred
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(host) -> (host, original)
        self.pin = torch.cuda.is_available()

    def to_host(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if not self.pred(obj):
                return obj
            host = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=self.pin)
            host.copy_(obj.detach())
            self.pairs[id(host)] = (host, obj)
            return host
        if isinstance(obj, list):
            return [self.to_host(o) for o in obj]
        if isinstance(obj, tuple):
            return tuple(self.to_host(o) for o in obj)
        return obj

    def copy_back(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Writes the host outputs into their originals; returns the outputs as the caller knows them."""
        out = []
        for h in outputs:
            pair = self.pairs.get(id(h))
            if pair is None:
                out.append(h)
                continue
            with torch.no_grad():
                pair[1].copy_(pair[0])
            out.append(pair[1])
        return out


def staged(call: Callable[..., ZmqWork], args: tuple[Any, ...], what: str, timeout: float,
           pred: Predicate = off_host) -> ZmqWork:
    """Runs ``call(*args)`` on host copies of the tensors ``pred`` selects; see the module docstring.

    Args:
        call: issues the CPU operation and returns its Work (whose outputs are host tensors).
        args: the operation's arguments; tensors may sit in (nested) lists.
        what: label of the returned Work.
        timeout: default wait of the returned Work (the group timeout).
        pred: which tensors to stage (default: those not in CPU memory).

    Returns:
        A Work over the original tensors, completed after the copy back.
    """
    st = _Stager(pred)
    inner = call(*st.to_host(args))
    outer = ZmqWork([], what, timeout)
    outer.on_timeout = inner.on_timeout  # a receive is withdrawn when its wait gives up

    def finish(fut: torch.futures.Future) -> None:
        try:
            outer._source = inner._source
            outer.set_done(st.copy_back(list(fut.value())))
        except BaseException as exc:  # the operation's error, or the copy back's
            outer.set_error(exc)

    inner.get_future().add_done_callback(finish)
    return outer
