"""``commlayer simulate``: a discrete-event simulator of commlayer's own algorithms at fleet scale.

It replays each algorithm's message schedule (the one its own module describes and the real code
is tested to follow, :mod:`commlayer.topologies.schedule`) over the WAN emulator's link models
(:mod:`commlayer.sim.links`), through FIFO link/device queues (:mod:`commlayer.sim.engine`), with the
adapt cost model's CPU constants and measured codec profiles. CLI/benchmark-side: it imports
:mod:`commlayer.wan`, so nothing in the library imports it.
"""
