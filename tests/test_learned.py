"""Learned eviction (LKV, SP-KV) on tiny random models: gradients, inference selection, training, checkpoints."""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

import methods
from harness.attention import attention_modules, install, stash_hidden
from harness.cache import RaggedLayer, kept_per_head
from harness.compat import cache_of
from harness.compress import n_keep
from harness.errors import KvbenchError
from harness.models import build_tiny, model_identity
from harness.pipeline import run_sample
from harness.train import Batch, Example, prepare, random_example, step_loss
from methods._learned import load_checkpoint, save_checkpoint
from methods.lkv import LKVLearner, LKVParams, hard_budgets, keep_logprobs, share_out, soft_budgets
from methods.spkv import GatedLayer, SPKVLearner, SPKVParams

CTX = torch.randint(3, 250, (200,), generator=torch.Generator().manual_seed(1)).tolist()
QUESTION = torch.randint(3, 250, (7,), generator=torch.Generator().manual_seed(2)).tolist()


def method_cfg(name, **overrides):
    return methods.config(name, **overrides)


def batch_for(model, ex, want_hidden=False):
    return prepare(model, attention_modules(model), ex, 6, set(), want_hidden)


def info(model):
    return {"name": "tiny-random", "path": None, "family": "llama", **model_identity(model)}


# ---------------------------------------------------------------------------------------------- LKV pieces
def test_share_out_is_exact_and_capped():
    shares = torch.softmax(torch.tensor([3.0, 0.0, -1.0, 0.5, 2.0, -4.0]), 0)
    b = share_out(shares, 6 * 30, 2, 100)
    assert int(b.sum()) == 180 and int(b.max()) <= 100 and int(b.min()) >= 2
    # The largest share is capped and its excess goes to the others, still summing exactly.
    b = hard_budgets(torch.tensor([[8.0, 0.0], [0.0, 0.0]]), 50, 0.3, min_budget=1)
    assert int(b.sum()) == 4 * n_keep(50, 0.3) and int(b.max()) == 50
    assert hard_budgets(torch.zeros(3, 2), 97, 0.15).tolist() == [[n_keep(97, 0.15)] * 2] * 3


def test_hard_budgets_when_min_budget_and_cap_both_bind():
    # 4 heads, T = 9, keep 0.1 -> 1 entry each, but min_budget 4: the total becomes 4 x 4 and every head keeps 4
    # (the water-filling capped the large share at 9 first; its rounding used to fail with "selected index k
    # out of range")
    assert hard_budgets(torch.tensor([[0.0, 0.0], [0.0, 2.0]]), 9, 0.1, min_budget=4).tolist() == [[4, 4], [4, 4]]
    b = hard_budgets(torch.tensor([[6.0, 0.0, -3.0], [0.0, 1.0, 5.0]]), 40, 0.25, min_budget=8)
    assert int(b.sum()) == 6 * n_keep(40, 0.25) and int(b.min()) >= 8 and int(b.max()) <= 40


def test_keep_probabilities_match_budget_with_implicit_gradient():
    torch.manual_seed(0)
    s = torch.randn(2, 40, requires_grad=True)
    b = torch.tensor([6.0, 15.0], requires_grad=True)
    protected = torch.zeros(40, dtype=torch.bool)
    protected[-4:] = True
    lp = keep_logprobs(s, b, protected)
    assert torch.allclose(lp.exp().sum(1), b, atol=1e-4)
    assert torch.all(lp[:, -4:] == 0)
    lp.exp().sum().backward()  # the kept count is fixed by the budget: d/ds = 0, d/db = 1
    assert torch.allclose(b.grad, torch.ones(2), atol=1e-4) and s.grad.abs().max() < 1e-4


def test_lkv_gradients_reach_scorer_and_budget_parameters(tiny_llama):
    model, _ = tiny_llama
    for mode in ("bias", "throttle"):
        learner = LKVLearner(model, method_cfg("lkv"), {"mode": mode}, seed=0)
        batch = batch_for(model, random_example(259, 160, 5))
        with install(model):
            loss, _ = step_loss(learner, model, attention_modules(model), batch, 0.2, torch.Generator().manual_seed(0), 1.0, 1.0)
        loss.backward()
        p = learner.params
        for name in ("w1", "b1", "w2", "budget_logits"):
            g = getattr(p, name).grad
            assert g is not None and g.abs().sum() > 0, (mode, name)


def _lkv_checkpoint(model, tmp_path, seed=3):
    sig = model_identity(model)
    params = LKVParams(sig["n_layers"], sig["n_kv_heads"], sig["head_dim"], sig["hidden_size"], 8, False, seed=seed)
    with torch.no_grad():
        params.budget_logits.copy_(torch.randn(params.budget_logits.shape, generator=torch.Generator().manual_seed(seed)))
    save_checkpoint(tmp_path, "lkv", params, info(model), {"width": 8, "use_hidden": False})
    return params


def test_lkv_inference_keeps_top_b_of_learned_scores_with_learned_budgets(tiny_llama, tmp_path):
    model, tok = tiny_llama
    params = _lkv_checkpoint(model, tmp_path)
    m = methods.build_method(method_cfg("lkv", checkpoint=str(tmp_path), n_recent=4, min_budget=4))
    assert m.name == "lkv"
    ratio = 0.2
    with install(model) as hooks:
        out = run_sample(model, tok, hooks, m, CTX, QUESTION, [ratio], False, 3, [], 0, keep_indices=True)[0]
    with torch.no_grad():
        full = cache_of(model(input_ids=torch.tensor([CTX]), use_cache=True))
    T = len(CTX)
    budgets = hard_budgets(params.budget_logits, T, ratio, 4)
    assert out.budgets == budgets.tolist() and int(budgets.sum()) == budgets.numel() * n_keep(T, ratio)
    for layer, idx in enumerate(out.kept):
        s = params.scores(layer, full.layers[layer].keys, full.layers[layer].values)[0]
        heads = idx if isinstance(idx, list) else list(idx)
        for h, kept in enumerate(heads):
            s_h = s[h].clone()
            s_h[-4:] = float("inf")  # the recent window is inside the budget
            want = s_h.topk(int(budgets[layer, h])).indices.sort().values
            assert kept.tolist() == want.tolist()


# ---------------------------------------------------------------------------------------------- SP-KV
def _spkv_checkpoint(model, tmp_path, window=16):
    sig = model_identity(model)
    params = SPKVParams(sig["n_layers"], sig["n_kv_heads"], sig["hidden_size"], "hidden", 0.0)
    with torch.no_grad():  # gates spread around the threshold
        params.w.copy_(torch.randn(params.w.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
        params.b.fill_(-0.5)
    save_checkpoint(tmp_path, "spkv", params, info(model), {"feature": "hidden", "window": window})
    return params


def test_spkv_keeps_window_and_exactly_the_entries_above_threshold(tiny_llama, tmp_path):
    model, tok = tiny_llama
    params = _spkv_checkpoint(model, tmp_path)
    m = methods.build_method(method_cfg("spkv", checkpoint=str(tmp_path)))
    thr, window, T = m.scorer.threshold, m.scorer.window, len(CTX)
    with install(model) as hooks:
        outs = run_sample(model, tok, hooks, m, CTX, QUESTION, [0.1, 0.5], False, 3, [], 0, keep_indices=True)
    # Reference gates: the hidden states of the gated prefill (its mask comes from prefill_patch).
    store = {}
    handles = stash_hidden(attention_modules(model), store)
    with install(model), m.scorer.prefill_patch(model, 1.0), torch.no_grad():
        model(input_ids=torch.tensor([CTX]), use_cache=False)
    for h in handles:
        h.remove()
    n_kept, n_all = 0, 0
    for layer, idx in enumerate(outs[0].kept):
        u = torch.sigmoid(params.logits(layer, store[layer], None))[0]
        heads = [torch.arange(T)] * u.shape[0] if idx is None else (idx if isinstance(idx, list) else list(idx))
        for h, kept in enumerate(heads):
            want = ((u[h] > thr) | (torch.arange(T) >= T - window)).nonzero().flatten()
            assert kept.tolist() == want.tolist()
            n_kept, n_all = n_kept + len(want), n_all + T
    assert 0 < n_kept < n_all  # some gates closed, some open
    # keep_ratio is ignored: both ratios keep the same; the achieved ratio is recorded.
    assert outs[0].kept_tokens == outs[1].kept_tokens and outs[0].budgets == outs[1].budgets
    assert outs[0].extras["spkv_keep_ratio"] == pytest.approx(n_kept / n_all)


def test_spkv_prefill_mask_hides_closed_gates_outside_window(tiny_llama, tmp_path):
    model, _ = tiny_llama
    _spkv_checkpoint(model, tmp_path)
    m = methods.build_method(method_cfg("spkv", checkpoint=str(tmp_path)))
    ids = torch.tensor([CTX])
    with install(model), torch.no_grad():
        plain = model(input_ids=ids).logits
        with m.scorer.prefill_patch(model, 1.0):
            gated = model(input_ids=ids).logits
    window = m.scorer.window
    assert torch.allclose(plain[:, :window], gated[:, :window], atol=1e-5)  # inside the window: unchanged
    assert not torch.allclose(plain[:, window + 8:], gated[:, window + 8:], atol=1e-3)


def test_gated_layer_drops_entries_leaving_the_window_with_closed_gates():
    keys = [torch.arange(6.0).view(1, 1, 6, 1)]
    layer = GatedLayer(keys, [k.clone() for k in keys], [torch.tensor([0, 2, 5, 7, 8, 9])],
                       [torch.tensor([0.05, 0.9, 0.05, 0.05, 0.3, 0.01])], next_pos=10, window=3, threshold=0.1,
                       gate_fn=lambda k: torch.full((1, k.shape[-2]), 0.0))
    k, _ = layer.update(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
    # Query at 10 sees 8, 9 (window 3: positions 8..10) and older open gates (2); 0, 5, 7 are dropped.
    assert layer.positions[0].tolist() == [2, 8, 9, 10] and k.lengths == [4]
    layer.update(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))  # query 11: 8 left the window but u 0.3 > 0.1
    assert layer.positions[0].tolist() == [2, 8, 9, 10, 11]
    layer.update(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))  # query 12: 9 (u 0.01) leaves and is dropped
    assert layer.positions[0].tolist() == [2, 8, 10, 11, 12] and layer.lengths == [5]


def test_gated_layer_multi_token_step_hides_what_left_the_window_with_a_closed_gate():
    from harness.attention import ragged_attention

    keys = [torch.arange(6.0).view(1, 1, 6, 1)]
    layer = GatedLayer(keys, [k.clone() for k in keys], [torch.tensor([0, 2, 5, 7, 8, 9])],
                       [torch.tensor([0.05, 0.9, 0.05, 0.05, 0.3, 0.01])], next_pos=10, window=3, threshold=0.1,
                       gate_fn=lambda k: torch.zeros(1, k.shape[-2]))
    new_k = torch.randn(1, 1, 4, 1, generator=torch.Generator().manual_seed(0))
    k, v = layer.update(new_k, new_k.clone())  # queries at 10..13 in one step
    assert layer.positions[0].tolist() == [2, 8, 9, 10, 11, 12, 13]
    T, F = True, False
    expected = [[T, T, T, T, F, F, F],   # 10: 2 open, 8 and 9 in the window, itself
                [T, T, T, T, T, F, F],   # 11: 8 left the window but its gate 0.3 is open
                [T, T, F, T, T, T, F],   # 12: 9 (gate 0.01) left the window
                [T, T, F, F, T, T, T]]   # 13: 10 (gate 0, written in this step) left the window too
    assert k.masks[0].tolist() == expected
    q = torch.randn(1, 1, 4, 1, generator=torch.Generator().manual_seed(1))
    out = ragged_attention(q, k, v, scaling=1.0)[0, :, 0, 0]
    logits = (q[0, 0] @ k.heads[0][0, 0].T).masked_fill(~torch.tensor(expected), float("-inf"))
    ref = (logits.softmax(-1) @ v.heads[0][0, 0])[:, 0]
    assert torch.allclose(out, ref, atol=1e-6)


def test_spkv_gradients_reach_the_predictor():
    model, _ = build_tiny("llama")
    learner = SPKVLearner(model, method_cfg("spkv", window=16), {"init_bias": 0.0}, seed=0)
    batch = batch_for(model, random_example(259, 120, 4))
    with install(model):
        loss, stats = step_loss(learner, model, attention_modules(model), batch, 0.2, torch.Generator(), 1.0, 1.0)
    loss.backward()
    assert learner.params.w.grad.abs().sum() > 0 and learner.params.b.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # the model stays frozen


def test_spkv_sparsity_target_is_a_hinge_on_the_mean_far_gate(tiny_llama):
    model, _ = tiny_llama
    batch = batch_for(model, random_example(259, 160, 9))
    sparsity = {}
    for target in (None, 0.5, 0.9):
        learner = SPKVLearner(model, method_cfg("spkv", window=16),
                              {"init_bias": 1.0, "sparsity_weight": 0.5, "sparsity_target": target}, seed=0)
        with install(model):
            _, aux, stats = learner.student_logits(model, attention_modules(model), batch, 0.2, torch.Generator())
        sparsity[target] = (float(aux["sparsity"]), stats["u"])
    u = sparsity[None][1]
    assert abs(u - torch.sigmoid(torch.tensor(1.0)).item()) < 1e-6  # w = 0: every gate is sigmoid(init_bias)
    assert sparsity[None][0] == pytest.approx(0.5 * u)
    assert sparsity[0.5][0] == pytest.approx(0.5 * (u - 0.5))
    assert sparsity[0.9][0] == 0.0  # below the target: no pressure
    with pytest.raises(KvbenchError, match="sparsity_target=1.5"):
        SPKVLearner(model, method_cfg("spkv", window=16), {"sparsity_target": 1.5}, seed=0)


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["lkv", "spkv"])
def test_a_few_steps_lower_the_loss(tiny_llama, name):
    model, _ = tiny_llama
    torch.manual_seed(0)
    if name == "lkv":
        learner = LKVLearner(model, method_cfg("lkv", n_recent=4), {"width": 16}, seed=0)
    else:
        learner = SPKVLearner(model, method_cfg("spkv", window=16), {"init_bias": 1.0, "sparsity_weight": 0.5}, seed=0)
    opt = torch.optim.Adam(learner.trainable(), lr=0.03)
    batch = batch_for(model, random_example(259, 160, 9))
    losses = []
    with install(model):
        mods = attention_modules(model)
        for _ in range(12):
            loss, _ = step_loss(learner, model, mods, batch, 0.1, torch.Generator().manual_seed(0), 1.0, 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 1e-3, losses


def _train_cfg(name, out, steps, **extra):
    from hydra import compose, initialize_config_dir

    overrides = [f"method={name}", f"out={out}", f"steps={steps}", "save_every=1", "data.source=random",
                 "data.context_length=96", "data.max_new_tokens=3", "progress=false"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    with initialize_config_dir(config_dir=str(Path("conf").resolve()), version_base=None):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("name", ["lkv", "spkv"])
def test_checkpoint_round_trips_and_training_resumes(tmp_path, name):
    from harness.train import train

    out = tmp_path / name
    extra = {"lkv.width": 8} if name == "lkv" else {"method.scorer.window": 16}
    train(_train_cfg(name, out, 2, **extra))
    first = load_checkpoint(out, name)[1]
    config = train(_train_cfg(name, out, 3, **extra))  # resumes at step 2
    assert config["step"] == 3 and len((out / "history.jsonl").read_text().splitlines()) == 3
    assert config["model"]["n_layers"] == 2 and config["model"]["name"] == "tiny-random"
    saved = load_checkpoint(out, name)[1]
    assert any(not torch.equal(first[k], saved[k]) for k in saved)
    m = methods.build_method(method_cfg(name, checkpoint=str(out)))
    loaded = m.scorer.params.state_dict()
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)


@pytest.mark.parametrize("name", ["lkv", "spkv"])
def test_checkpoint_for_another_model_is_refused(tiny_llama, tmp_path, name):
    model, tok = tiny_llama
    (_lkv_checkpoint if name == "lkv" else _spkv_checkpoint)(model, tmp_path)
    m = methods.build_method(method_cfg(name, checkpoint=str(tmp_path)))
    other, _ = build_tiny("llama", num_hidden_layers=3)
    for part in m.parts:  # the runner binds the model first; every part that read the checkpoint refuses
        if part.input_files():
            with pytest.raises(KvbenchError, match="was trained for model tiny-random"):
                part.bind_model(other)
    with install(other) as hooks, pytest.raises(KvbenchError, match="was trained for model tiny-random"):
        run_sample(other, tok, hooks, m, CTX, QUESTION, [0.2], False, 2, [], 0)
    with pytest.raises(KvbenchError, match="has no config.json"):
        methods.build_method(method_cfg(name, checkpoint=str(tmp_path / "missing")))


def test_training_into_a_dir_of_another_model_is_refused(tmp_path):
    from harness.train import train

    train(_train_cfg("lkv", tmp_path, 1, **{"lkv.width": 8}))
    with pytest.raises(KvbenchError, match="checkpoint for model tiny-random .*model_type"):
        train(_train_cfg("lkv", tmp_path, 2, **{"lkv.width": 8, "model.family": "qwen3"}))


# ---------------------------------------------------------------------------------------------- contract
def test_learners_are_found_by_method_name():
    from harness.learning import LEARNERS, Learner, register_learner
    from harness.train import learners

    assert learners() == {"lkv": LKVLearner, "spkv": SPKVLearner}
    assert LKVLearner.registered_name == "lkv" and issubclass(SPKVLearner, Learner)

    @register_learner("toy")
    class Toy(Learner):
        pass

    try:
        assert learners()["toy"] is Toy and Toy.registered_name == "toy"
    finally:
        del LEARNERS["toy"]


def test_checkpoint_of_other_weights_is_refused_and_older_checkpoints_still_bind(tmp_path):
    from methods.lkv import LKVScorer

    model, _ = build_tiny("llama")
    _lkv_checkpoint(model, tmp_path)
    LKVScorer(checkpoint=str(tmp_path)).bind_model(model)
    tuned, _ = build_tiny("llama")  # the same architecture, other weights (e.g. a fine-tune)
    with torch.no_grad():
        tuned.get_input_embeddings().weight.mul_(1.1)
    with pytest.raises(KvbenchError, match="was trained for model tiny-random .another model: weights fingerprint") as err:
        LKVScorer(checkpoint=str(tmp_path)).bind_model(tuned)
    assert "\n" not in str(err.value)
    # config.json of an earlier version: no n_heads / config_hash; the facts it has are the same, so it binds
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("n_heads", "config_hash"):
        del config["model"][key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    LKVScorer(checkpoint=str(tmp_path)).bind_model(model)
    with pytest.raises(KvbenchError, match="weights fingerprint"):
        LKVScorer(checkpoint=str(tmp_path)).bind_model(tuned)
