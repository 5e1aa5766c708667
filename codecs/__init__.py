"""Gradient codecs (installed as ``commlayer.codecs``)."""
