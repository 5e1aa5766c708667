"""commlayer.sync."""
