"""Fast KVzip (methods/fastkvzip.py): the gate, the local window, the schedule and the gate files, by hand.
kvpress conformance: tests/test_conformance_extra.py -k fastkvzip."""
from __future__ import annotations

import math

import pytest
import torch

import methods
from harness.compress import LayerInputs
from harness.errors import KvbenchError
from methods.fastkvzip import (FastKVzipScorer, Gate, check_gates, fit_gates, load_gates, local_window, lr_factor,
                               save_gates)


def _hand_gate(b: float = 0.5, c: float = 1.0) -> Gate:
    # 1 KV head, group 1, dim 2, one sink key: q = k = RMSNorm(h) (identity projections)
    gate = Gate(input_dim=2, n_heads=1, group=1, dim=2, sink=1)
    with torch.no_grad():
        gate.q_proj.weight.copy_(torch.eye(2))
        gate.q_proj.bias.zero_()
        gate.k_proj.weight.copy_(torch.eye(2))
        gate.k_base.copy_(torch.tensor([c, 0.0]).view(1, 1, 1, 2))
        gate.b.fill_(b)
    return gate


def test_gate_by_hand():
    # h = (1, 0): RMSNorm -> (sqrt 2, 0) for q and k; own logit = 2 / sqrt 2 + b = sqrt 2 + b; the sink's logit
    # = c * sqrt 2 / sqrt 2 = c; gate = 1 / (1 + exp(c - sqrt 2 - b)). h = (0, 3): q = k = (0, sqrt 2): own
    # sqrt 2 + b, sink 0.
    got = _hand_gate()(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    want = [1 / (1 + math.exp(1.0 - math.sqrt(2) - 0.5)), 1 / (1 + math.exp(0.0 - math.sqrt(2) - 0.5))]
    assert got.shape == (1, 2) and torch.allclose(got[0], torch.tensor(want))


def test_gate_means_over_the_group():
    gate = Gate(input_dim=4, n_heads=2, group=3, dim=2, sink=2)
    h = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gate.b.copy_(torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(1)))
        gate.k_base.copy_(torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        out = gate(h)
        q, k = gate.q_norm(gate.q_proj(h).view(5, 2, 3, 2)), gate.k_norm(gate.k_proj(h).view(5, 2, 2))
    for head in range(2):
        for t in range(5):
            vals = []
            for g in range(3):
                own = float(k[t, head] @ q[t, head, g]) / math.sqrt(2) + float(gate.b[head, 0, g].detach())
                base = [float(gate.k_base[head, 0, s].detach() @ q[t, head, g]) / math.sqrt(2) for s in range(2)]
                vals.append(1 / (1 + sum(math.exp(x - own) for x in base)))
            assert float(out[head, t]) == pytest.approx(sum(vals) / 3, rel=1e-5)


def test_local_window_and_schedule():
    assert local_window(200, 0.02, 4096, 32000) == 4 and local_window(10, 0.02, 4096, 32000) == 1
    assert local_window(40000, 0.02, 4096, 32000) == 4096
    assert [lr_factor(s, 1000) for s in (0, 5, 10, 499, 500, 749, 750, 999)] == [0, 0.05, 1, 1, 0.5, 0.5, 0.25, 0.25]


def test_scorer_protects_the_window():
    scorer = FastKVzipScorer()
    scorer.gates = [_hand_gate()]
    h = torch.tensor([[[1.0, 0.0]] * 100])
    inputs = LayerInputs(layer_idx=0, n_layers=1, queries=torch.zeros(1, 1, 100, 2), keys=torch.zeros(1, 1, 100, 2),
                         values=torch.zeros(1, 1, 100, 2), module=torch.nn.Module(), generator=torch.Generator(),
                         hidden_states=h)
    s = scorer.score(inputs)
    assert bool(torch.isinf(s[..., -2:]).all()) and bool(torch.isfinite(s[..., :-2]).all())  # int(100 * 0.02) = 2


def test_training_learns_a_separable_target():
    # tokens whose first coordinate is positive score 0.9, the others 0.1: the gate must rank them apart
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 1, 4, generator=gen)
    y = torch.where(x[:, :, :1] > 0, 0.9, 0.1).expand(600, 1, 2).contiguous()
    gate = fit_gates(x, y, group=2, dim=4, sink=2, steps=300, batch_size=200)[0]
    with torch.no_grad():
        pred = gate(x[:, 0])  # [H, N]
    pos = x[:, 0, 0] > 0
    assert float(pred[:, pos].mean()) > 0.8 and float(pred[:, ~pos].mean()) < 0.2
    assert float(((pred > 0.5) == pos).float().mean()) > 0.95  # only tokens near the boundary may be misplaced


def test_files_and_the_model_check(tmp_path, tiny_llama):
    from harness.models import build_tiny, model_identity

    model = tiny_llama[0]
    gates = [Gate(64, 2, 2) for _ in range(2)]
    path = save_gates(tmp_path / "g.safetensors", gates, {"model": "tiny", **model_identity(model)})
    back, meta = load_gates(path)
    assert all(torch.equal(a, b) for g, h in zip(gates, back) for a, b in zip(g.state_dict().values(),
                                                                             h.state_dict().values()))
    check_gates(back, meta, model, "g")
    with pytest.raises(KvbenchError, match="was trained for model"):
        check_gates(back, meta, build_tiny("llama", seed=1)[0], "g")
    with pytest.raises(KvbenchError, match="holds gates for 3 layers"):
        check_gates([Gate(64, 2, 2) for _ in range(3)], {}, model, "g")
    (tmp_path / "x.pt").write_bytes(b"\x80")
    with pytest.raises(KvbenchError, match="pickled .pt"):
        load_gates(tmp_path / "x.pt")
    with pytest.raises(KvbenchError, match="does not exist"):
        FastKVzipScorer(gates=str(tmp_path / "none.safetensors"))


def test_preset_only_switches_counts():
    ours, kv = (methods.build_method(methods.config("fastkvzip", **p)) for p in ({}, {"preset": "kvpress"}))
    assert ours.selector.n_sink == kv.selector.n_sink == 4 and ours.allocator.scope == kv.allocator.scope == "model"
    assert (ours.budget_rule, kv.budget_rule) == ("floor", "kvpress")
