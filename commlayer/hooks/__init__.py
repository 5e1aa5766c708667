"""DDP communication hooks (codecs over any torch.distributed backend)."""

from commlayer.hooks.codec_hook import CodecHookState, codec_hook

__all__ = ["CodecHookState", "codec_hook"]
