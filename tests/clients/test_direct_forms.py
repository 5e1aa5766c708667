"""The zmq group object accepts every call form gloo's does, with the same results."""

from __future__ import annotations


import numpy as np

from commlayer.testing.launch import run_world

import direct_forms


def test_every_gloo_call_form_matches_gloo() -> None:
    results = run_world(direct_forms.run_forms, 2, timeout=240)
    for rank, res in enumerate(results):
        assert res["zmq"].keys() == res["gloo"].keys()
        for name in res["gloo"]:
            z, g = res["zmq"][name], res["gloo"][name]
            zs, gs = (z, g) if isinstance(g, list) else ([z], [g])
            assert len(zs) == len(gs), name
            for a, b in zip(zs, gs):
                np.testing.assert_array_equal(a, b, err_msg=f"rank {rank}: {name}")


def test_torchft_style_wrapper_reduces_for_real() -> None:
    # torchft's error-swallowing wrapper handed back an unreduced tensor when the short form raised.
    results = run_world(direct_forms.run_wrapper, 2, timeout=120)
    for res in results:
        assert res["errors"] == []
        assert res["sum"] == [3.0] * 3
        assert res["avg"] == [1.5] * 3


def test_torchft_style_reconfigurable_wrapper() -> None:
    results = run_world(direct_forms.run_reconfigure, 2, timeout=120)
    for res in results:
        assert res["quorum0"] == [3.0] * 4  # 1 + 2
        assert res["quorum1"] == [5.0] * 4  # 2 + 3, on a group built anew over a fresh prefix
        assert res["devices"] == ["cpu"]
