"""The demo's training task and runner (used by ``commlayer demo`` and benchmarks/time_to_accuracy.py).

* :mod:`commlayer.demo.task`: synthetic classification data and the MLP.
* :mod:`commlayer.demo.configs`: ``BACKEND:METHOD[:ARG]`` training configurations.
* :mod:`commlayer.demo.worker`: one rank (``python -m commlayer.demo.worker``).
* :mod:`commlayer.demo.runner`: N ranks over ``commlayer.wan`` links, results and byte counts.
* :mod:`commlayer.demo.report`: tables and the time-to-accuracy plot.
"""
