"""commlayer.hooks."""
