"""Parameter-server training loop helper."""

from __future__ import annotations

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from commlayer.topologies.ps import ParameterServer


class ParameterServerTrainer:
    """Trains ``model`` through a parameter server: the servers run the optimizer.

    Usage::

        ps = world.parameter_server(servers=2, mode="async", staleness=2, lr=0.05)
        trainer = ParameterServerTrainer(ps, model)        # the first worker's weights win
        for batch in data:
            model.zero_grad(); loss(model, batch).backward()
            trainer.step()                                  # push gradients, pull parameters
        trainer.close()

    Args:
        ps: the :class:`ParameterServer` (this rank must be a worker).
        model: the local replica; its parameters are overwritten by each pull.
    """

    def __init__(self, ps: ParameterServer, model: torch.nn.Module) -> None:
        if not ps.is_worker:
            raise ValueError("Expected a worker rank; dedicated servers call ps.serve()")
        self.ps, self.model = ps, model
        self.params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            vector_to_parameters(ps.init(parameters_to_vector(self.params)), self.params)

    @torch.no_grad()
    def step(self) -> None:
        """Pushes the current gradients (zeros where missing) and loads the pulled parameters."""
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        vector_to_parameters(self.ps.step(grad), self.params)

    def close(self) -> None:
        self.ps.close()
