"""The slice end to end on tiny random models: equivalence with generate, positions after pruning,
ragged per-head caches against a masked reference, hooks removed, all four families."""
import pytest
import torch
from test_selection import method
from transformers import DynamicCache

from harness.attention import ATTN_NAME, install
from harness.cache import RaggedLayer, cache_bytes, kept_per_head, prune
from harness.compat import cache_of, with_cache
from harness.models import build_tiny
from harness.pipeline import decode, prefill, run_sample

torch.manual_seed(0)
CTX = torch.randint(3, 250, (1, 96), generator=torch.Generator().manual_seed(1))[0].tolist()
QUESTION = torch.randint(3, 250, (1, 7), generator=torch.Generator().manual_seed(2))[0].tolist()


def generate(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         pad_token_id=2, eos_token_id=None)
    return out[0, len(ids):].tolist()


def our_tokens(model, tok, m, ratio, query_aware, n=12):
    # No EOS so both sides decode exactly n tokens; token ids compared, not text.
    model.generation_config.eos_token_id = None
    tok_eos = tok.eos_token_id
    with install(model) as hooks:
        pre = prefill(model, hooks, CTX + QUESTION if query_aware else CTX, m, seed=0)
        _, kept = m.plan(pre.scores, ratio) if m.compresses else (None, [None] * len(pre.cache.layers))
        cache = prune(pre.cache, kept)
        tail = [] if query_aware else QUESTION
        tok.eos_token_id = None
        try:
            gen = decode(model, cache, tail, pre.last_logits, len(CTX) + (len(QUESTION) if query_aware else 0), n, tok, [])
        finally:
            tok.eos_token_id = tok_eos
    return gen.token_ids


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_full_cache_matches_generate_all_families(family):
    model, tok = build_tiny(family)
    ref = generate(model, CTX + QUESTION, 12)
    assert our_tokens(model, tok, method("full"), 1.0, query_aware=True) == ref
    assert our_tokens(model, tok, method("full"), 1.0, query_aware=False) == ref
    # keep_ratio 1.0 with any method keeps everything: identical to full.
    assert our_tokens(model, tok, method("snapkv"), 1.0, query_aware=False) == ref
    # And a compressed run works on every family.
    assert len(our_tokens(model, tok, method("snapkv"), 0.25, query_aware=False)) == 12


def test_hooks_removed_after_run(tiny_llama):
    model, tok = tiny_llama
    from harness.attention import _HOOKS, _MASKS, attention_masks, attention_modules

    with install(model) as hooks:
        assert model.config._attn_implementation == ATTN_NAME
        assert set(_HOOKS) >= set(attention_modules(model))
        with hooks.scoring(method("snapkv").scorer, 0), attention_masks(hooks.modules, lambda *a: None):
            assert set(_MASKS) >= set(hooks.modules)
    assert model.config._attn_implementation == "sdpa"
    for m in model.modules():
        assert m not in _HOOKS and m not in _MASKS
        assert not any(name.startswith("_kvbench") for name in vars(m))  # nothing written onto the modules
        assert not m._forward_pre_hooks and not m._forward_hooks


def test_pruned_shapes_and_bytes_follow_keep_ratio(tiny_llama):
    model, tok = tiny_llama
    with install(model) as hooks:
        outs = run_sample(model, tok, hooks, method("snapkv"), CTX, QUESTION, [0.25, 0.5, 1.0], False, 4, [], 0)
    t = len(CTX)
    assert [o.kept_tokens for o in outs] == [t // 4, t // 2, t]
    for o in outs:
        assert o.kv_bytes_full == 2 * 2 * 2 * t * 16 * 4  # layers * (k,v) * kv heads * T * head_dim * fp32
        assert o.kv_bytes == o.kv_bytes_full * int(o.keep_ratio * t) // t
        assert o.budgets == [[int(o.keep_ratio * t)] * 2] * 2


def _masked_reference(model, full_cache, kept_by_layer_head, question, start):
    """Logits of the question with the full cache and a per-head mask hiding evicted context entries."""
    n_ctx = full_cache.layers[0].keys.shape[-2]
    n_q_heads = model.config.num_attention_heads
    group = n_q_heads // model.config.num_key_value_heads
    L = len(question)
    # Layers differ in what they keep, so run with a per-layer mask through a forward hook on each layer.
    masks = []
    for per_head in kept_by_layer_head:
        allowed = torch.zeros(n_q_heads, L, n_ctx + L, dtype=torch.bool)
        for qh in range(n_q_heads):
            allowed[qh, :, per_head[qh // group]] = True
        allowed[:, :, n_ctx:] = torch.ones(L, L, dtype=torch.bool).tril()
        masks.append(torch.zeros(1, n_q_heads, L, n_ctx + L).masked_fill(~allowed[None], float("-inf")))
    cache = prune(full_cache, [None] * len(full_cache.layers))
    handles = []
    for layer, mask in zip(model.model.layers, masks):
        def pre(mod, args, kwargs, mask=mask):
            kwargs["attention_mask"] = mask
            return args, kwargs
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        out = model(input_ids=torch.tensor([question]), position_ids=torch.arange(start, start + L)[None],
                    **with_cache(cache), attention_mask=masks[0])
    finally:
        for h in handles:
            h.remove()
    return out.logits[0]


def test_positions_and_ragged_heads_match_masked_reference(tiny_llama):
    model, tok = tiny_llama
    with torch.no_grad():
        full = cache_of(model(input_ids=torch.tensor([CTX]), **with_cache(DynamicCache()), use_cache=True))
        g = torch.Generator().manual_seed(0)
        n = len(CTX)
        kept = []  # layer 0 dense (same budget for both heads), layer 1 ragged (10 vs 40 entries)
        kept.append(torch.stack([torch.randperm(n, generator=g)[:30].sort().values for _ in range(2)]))
        kept.append([torch.randperm(n, generator=g)[:b].sort().values for b in (10, 40)])
        pruned = prune(full, kept)
        assert isinstance(pruned.layers[1], RaggedLayer) and kept_per_head(pruned) == [[30, 30], [10, 40]]
        assert cache_bytes(pruned) == (2 * 30 + 10 + 40) * 2 * 16 * 4
        ref = _masked_reference(model, full, [[k.tolist() for k in kept[0]], [k.tolist() for k in kept[1]]],
                                QUESTION, n)
        with install(model):
            out = model(input_ids=torch.tensor([QUESTION]), position_ids=torch.arange(n, n + len(QUESTION))[None],
                        **with_cache(pruned), use_cache=True)
            assert torch.allclose(out.logits[0], ref, atol=1e-5)
            # One more decode step appends to every head of the ragged layer.
            nxt = int(out.logits[0, -1].argmax())
            step = model(input_ids=torch.tensor([[nxt]]), position_ids=torch.tensor([[n + len(QUESTION)]]),
                         **with_cache(pruned), use_cache=True)
        assert pruned.layers[1].lengths == [10 + len(QUESTION) + 1, 40 + len(QUESTION) + 1]
        # Reference for the step: the full cache plus the question and the token, same masks.
        ref2 = _masked_reference(model, full, [[k.tolist() for k in kept[0]], [k.tolist() for k in kept[1]]],
                                 QUESTION + [nxt], n)
        assert torch.allclose(step.logits[0, -1], ref2[-1], atol=1e-5)


def test_wrong_positions_would_be_caught(tiny_llama):
    # Guard for the test above: shifting positions by the number of evicted tokens changes the logits.
    model, tok = tiny_llama
    with torch.no_grad():
        full = cache_of(model(input_ids=torch.tensor([CTX]), **with_cache(DynamicCache()), use_cache=True))
        kept = [torch.arange(48)[None].repeat(2, 1)] * 2
        with install(model):
            right = model(input_ids=torch.tensor([QUESTION]), position_ids=torch.arange(96, 103)[None],
                          **with_cache(prune(full, kept))).logits
            wrong = model(input_ids=torch.tensor([QUESTION]), position_ids=torch.arange(48, 55)[None],
                          **with_cache(prune(full, kept))).logits
    assert not torch.allclose(right, wrong, atol=1e-4)


def test_shared_prefill_gives_same_rows_as_separate(tiny_llama):
    model, tok = tiny_llama
    m = method("snapkv")
    with install(model) as hooks:
        together = run_sample(model, tok, hooks, m, CTX, QUESTION, [0.25, 0.5], False, 6, [], 0)
        alone = [run_sample(model, tok, hooks, m, CTX, QUESTION, [r], False, 6, [], 0)[0] for r in (0.25, 0.5)]
    for a, b in zip(together, alone):
        assert (a.prediction, a.kept_tokens, a.kv_bytes, a.budgets) == (b.prediction, b.kept_tokens, b.kv_bytes, b.budgets)
    assert together[1].prefill_s == 0.0  # the second ratio reused the first one's prefill


class _Scripted(torch.nn.Module):
    """A stand-in model whose next token is scripted by position: the logits at ``pos`` peak at ``script[pos]``."""

    def __init__(self, script: dict[int, int], vocab: int = 16):
        super().__init__()
        self.script, self.vocab, self.fed = script, vocab, []
        self.register_buffer("anchor", torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def forward(self, input_ids, position_ids, **kwargs):
        self.fed.append((input_ids[0].tolist(), position_ids[0].tolist()))
        logits = torch.zeros(1, 1, self.vocab)
        logits[0, 0, self.script[int(position_ids[0, -1]) + 1]] = 1.0
        return type("Out", (), {"logits": logits})()


def _peak(token: int, vocab: int = 16) -> torch.Tensor:
    logits = torch.zeros(1, vocab)
    logits[0, token] = 1.0
    return logits


def test_greedy_loop_stops_on_eos_stop_or_length():
    from harness.pipeline import greedy

    script = {11: 5, 12: 6, 13: 1, 14: 7}  # token 1 is the EOS at position 13
    model = _Scripted(script)
    assert greedy(model, None, _peak(4), 10, 8, {1}) == [4, 5, 6]  # EOS not returned
    assert model.fed == [([4], [10]), ([5], [11]), ([6], [12])]  # one token a step, explicit positions
    chosen = []
    assert greedy(_Scripted(script), None, _peak(4), 10, 8, {1}, keep_eos=True, chosen_from=chosen) == [4, 5, 6, 1]
    assert [int(c.argmax()) for c in chosen] == [4, 5, 6, 1]  # the logits each token was the argmax of
    assert greedy(_Scripted(script), None, _peak(4), 10, 2, {1}) == [4, 5]  # max_new_tokens
    assert greedy(_Scripted(script), None, _peak(4), 10, 8, {1}, stop=lambda t: t[-1] == 5) == [4, 5]
    assert greedy(_Scripted(script), None, _peak(1), 10, 8, {1}) == []  # EOS first: nothing, no forward


def test_eos_ids_from_the_generation_config_else_the_tokenizer():
    from types import SimpleNamespace as NS

    from harness.pipeline import eos_ids

    assert eos_ids(NS(generation_config=NS(eos_token_id=[3, 4])), NS(eos_token_id=2)) == {3, 4}
    assert eos_ids(NS(generation_config=NS(eos_token_id=5)), NS(eos_token_id=2)) == {5}
    assert eos_ids(NS(generation_config=None), NS(eos_token_id=2)) == {2}
    assert eos_ids(NS(generation_config=NS(eos_token_id=None)), NS(eos_token_id=None)) == set()
