"""VendiProjection: the fork's intervention, reversible, cached per matrix and options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny
from layerscope.errors import LayerscopeError
from layerscope.interventions import (SelectionCache, VendiProjection, intervene, laser_kept_rank, project_onto_rows,
                                      vendi_select)
from layerscope.models.architecture import architecture

IDS = torch.tensor([[5, 9, 31, 7, 2, 44]])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_projection_equals_selection_then_least_squares_and_restores(name):
    model, _ = tiny(name)
    arch = architecture(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(input_ids=IDS).logits
    W = arch.read_weight("down", 1).clone()
    k = laser_kept_rank(tuple(W.shape), 8)
    rows = vendi_select(W.float(), k)
    expected = project_onto_rows(W, rows)
    with torch.no_grad(), intervene(model, VendiProjection("fc_out", 1, rate=8)):
        edited = arch.read_weight("down", 1)
        torch.testing.assert_close(edited, expected, rtol=0, atol=0)
        lstsq = np.linalg.lstsq(W[rows].double().numpy().T, W.double().numpy().T, rcond=None)[0].T @ W[rows].double().numpy()
        np.testing.assert_allclose(edited.double().numpy(), lstsq, atol=1e-4)
        assert not torch.equal(model(input_ids=IDS).logits, reference)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_one_selection_serves_every_smaller_k_and_the_disk_cache_is_reused(tmp_path):
    model, _ = tiny("tiny-llama")
    cache = SelectionCache(tmp_path / "sel")
    for rate in (2, 5, 9):  # ascending rates: the largest k first
        with intervene(model, VendiProjection("fc_in", 2, rate=rate, cache=cache)):
            pass
    assert cache.computed == 1
    again = SelectionCache(tmp_path / "sel")
    with intervene(model, VendiProjection("fc_in", 2, rate=5, cache=again)):
        pass
    assert again.computed == 0 and len(list((tmp_path / "sel").glob("*.json"))) == 1
    with intervene(model, VendiProjection("fc_in", 2, rate=5, use_quality=True, cache=again)):
        pass
    assert again.computed == 1  # other options: another selection
    W = architecture(model).read_weight("gate", 2)
    k = laser_kept_rank(tuple(W.shape), 2)
    assert cache.select(W, k, {"bandwidth": 1.0, "use_quality": False, "minimize": False}) == vendi_select(W.float(), k)


def test_rate_zero_and_bad_input():
    model, _ = tiny("tiny-llama")
    reference = model(input_ids=IDS).logits
    with torch.no_grad(), intervene(model, VendiProjection("fc_in", 1, rate=0)):
        assert torch.equal(model(input_ids=IDS).logits, reference)
    with pytest.raises(LayerscopeError, match="exactly one of rate and k"):
        VendiProjection("fc_in", 1)
    with pytest.raises(LayerscopeError, match="rate"):
        VendiProjection("fc_in", 1, rate=12)
    with pytest.raises(LayerscopeError, match="too large"):
        with intervene(model, VendiProjection("fc_in", 1, k=10**6)):
            pass


def test_laser_command_with_vendi(tmp_path, capsys):
    import json

    import pandas as pd

    task = tmp_path / "task.mc.jsonl"
    task.write_text("\n".join(json.dumps({"id": str(i), "context": f"w{i} w{i + 5} is", "choices": ["yes", "no"],
                                          "label": i % 2}) for i in range(15)) + "\n")
    out = tmp_path / "v"
    code, stdout, err = run_cli(["laser", "tiny-llama", "--task", str(task), "--layers", "2", "--lname", "fc_out",
                                 "--rates", "5,9", "--intervention", "vendi", "--min-diversity", "--out", str(out),
                                 "--quiet"], capsys)
    assert code == 0, err
    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == 2 * 3 and "Vendi row selection" in (out / "report.html").read_text()
    assert len(list((out / "vendi-selections").glob("*.json"))) == 1
