"""Communication topologies over the commlayer transport (installed as ``commlayer.topologies``)."""
