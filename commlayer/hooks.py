"""DDP communication hooks (codecs over any torch.distributed backend).

A re-export of :mod:`commlayer.training.codec_hook`, where the training algorithms live together;
``from commlayer.hooks import CodecHookState, codec_hook`` keeps working.
"""

from commlayer.training.codec_hook import CodecHookState, TorchExchange, codec_hook

__all__ = ["CodecHookState", "TorchExchange", "codec_hook"]
