"""commlayer.wan."""
