"""Training with the non-allreduce topologies: gossip (D-PSGD) and parameter servers.

* :class:`GossipAverager`: decentralized data parallel in the spirit of torch's
  ``PeriodicModelAverager``: every rank keeps its own model, steps its own optimizer, and mixes
  its parameters with its graph neighbours (D-PSGD, Lian et al., NeurIPS 2017; CHOCO-SGD with a
  codec, Koloskova et al. 2019).
* :class:`ParameterServerTrainer`: workers push gradients and pull parameters from a
  :class:`commlayer.topologies.ps.ParameterServer` that runs the optimizer (sync, or async with
  a staleness bound).
"""

from commlayer.training.gossip import GossipAverager
from commlayer.training.ps import ParameterServerTrainer

__all__ = ["GossipAverager", "ParameterServerTrainer"]
