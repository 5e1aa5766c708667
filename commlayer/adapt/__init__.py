"""commlayer.adapt."""
