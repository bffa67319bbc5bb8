"""KVzap (methods/kvzap.py): kvpress's weight layout, the linear fit, the scorer's scores and file checks, by hand.
kvpress conformance: tests/test_conformance_extra.py -k kvzap."""
from __future__ import annotations

import json
import math

import pytest
import torch

import methods
from harness.compress import LayerInputs
from harness.errors import KvbenchError
from methods._kvzip_data import log_scores, spearman, split
from methods.kvzap import KVzapNet, KVzapScorer, check_kvzap, fit_linear, load_kvzap, save_kvzap


def test_state_dict_names_are_kvpress_kvzapmodels():
    assert sorted(KVzapNet(4, 2, 2).state_dict()) == ["layers.0.bias", "layers.0.weight", "layers.1.bias",
                                                       "layers.1.weight"]
    assert sorted(KVzapNet(4, 2, 1, hidden_dim=3).state_dict()) == ["layers.0.0.bias", "layers.0.0.weight",
                                                                     "layers.0.2.bias", "layers.0.2.weight"]


def test_linear_fit_recovers_a_linear_map():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, 5, generator=gen)
    w, b = torch.randn(2, 5, 3, generator=gen), torch.randn(2, 3, generator=gen)
    y = torch.einsum("nld,ldh->nlh", x, w) + b
    net = fit_linear(x, y, alpha=1e-9)
    for layer in range(2):
        assert torch.allclose(net.layers[layer].weight, w[layer].T, atol=1e-4)
        assert torch.allclose(net.layers[layer].bias, b[layer], atol=1e-4)


def _hand_net() -> KVzapNet:
    # head 0 scores the first hidden coordinate, head 1 minus it plus 1, in both layers
    net = KVzapNet(3, 2, 2)
    with torch.no_grad():
        for lin in net.layers:
            lin.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]))
            lin.bias.copy_(torch.tensor([0.0, 1.0]))
    return net


def test_scores_are_the_nets_output_per_kv_head():
    scorer = KVzapScorer(window=0)
    scorer.net = _hand_net()
    h = torch.tensor([[[2.0, 5.0, 5.0], [-1.0, 0.0, 0.0], [0.5, 9.0, 9.0]]])  # [B, T, hidden]
    inputs = LayerInputs(layer_idx=1, n_layers=2, queries=torch.zeros(1, 4, 3, 2), keys=torch.zeros(1, 2, 3, 2),
                         values=torch.zeros(1, 2, 3, 2), module=torch.nn.Module(), generator=torch.Generator(),
                         hidden_states=h)
    assert scorer.score(inputs).tolist() == [[[2.0, -1.0, 0.5], [-1.0, 2.0, 0.5]]]


def test_save_load_and_the_model_check(tmp_path, tiny_llama):
    model = tiny_llama[0]
    from harness.models import model_identity

    net = KVzapNet(model.config.hidden_size, model.config.num_key_value_heads, model.config.num_hidden_layers, 8)
    d = save_kvzap(tmp_path / "kvzap", net, {"model": "tiny", **model_identity(model)})
    cfg = json.loads((d / "config.json").read_text())
    assert {k: cfg[k] for k in ("model_type", "input_dim", "output_dim", "hidden_dim", "n_modules")} == {
        "model_type": "kvzap", "input_dim": 64, "output_dim": 2, "hidden_dim": 8, "n_modules": 2}
    back, cfg = load_kvzap(d)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), back.state_dict().values()))
    check_kvzap(back, cfg, model, "w")  # its own model: accepted
    from harness.models import build_tiny

    other = build_tiny("llama", seed=1)[0]  # same shapes, other weights
    with pytest.raises(KvbenchError, match="was trained for model"):
        check_kvzap(back, cfg, other, "w")
    with pytest.raises(KvbenchError, match="maps hidden 64 to 2 KV heads in 3 layers"):
        check_kvzap(KVzapNet(64, 2, 3), {}, model, "w")
    (d / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(KvbenchError):
        load_kvzap(d)
    with pytest.raises(KvbenchError, match="is not a KVzap directory"):
        KVzapScorer(weights=str(tmp_path / "nothing"))


def test_presets_paper_threshold_and_kvpress_scorer_press():
    ours = methods.build_method(methods.config("kvzap"))
    assert ours.allocator.scope == "model" and ours.scorer.window == 128 and ours.budget_rule == "floor"
    kv = methods.build_method(methods.config("kvzap", preset="kvpress"))
    assert kv.allocator.scope == "head" and kv.scorer.window == 0 and kv.budget_rule == "kvpress"


def test_targets_split_and_rank_correlation():
    assert torch.allclose(log_scores(torch.tensor([1.0, math.e, 0.0]))[:2], torch.tensor([0.0, 1.0]))
    assert bool(torch.isfinite(log_scores(torch.tensor([0.0]))).all())
    tr, te = split(250)
    assert te.tolist() == [99, 199] and tr.numel() == 248
    a = torch.arange(10.0).view(10, 1, 1)
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)


def test_the_window_ranks_above_every_prediction_latest_highest():
    scorer = KVzapScorer(window=2)
    scorer.net = _hand_net()
    h = torch.tensor([[[2.0, 0, 0], [-1.0, 0, 0], [7.0, 0, 0], [0.5, 0, 0]]])
    inputs = LayerInputs(layer_idx=0, n_layers=2, queries=torch.zeros(1, 4, 4, 2), keys=torch.zeros(1, 2, 4, 2),
                         values=torch.zeros(1, 2, 4, 2), module=torch.nn.Module(), generator=torch.Generator(),
                         hidden_states=h)
    # predictions head 0: 2, -1, 7, 0.5; head 1: -1, 2, -6, 0.5; max 7 -> the last two become 8 and 9
    assert scorer.score(inputs).tolist() == [[[2.0, -1.0, 8.0, 9.0], [-1.0, 2.0, 8.0, 9.0]]]
