"""Dump which KV entries NVIDIA kvpress keeps, as conformance fixtures for kvbench's methods.

Run with the *kvpress* environment's python (kvpress 0.5.5 pins transformers<5.3, so it cannot share
kvbench's .venv: make it with the kvpress environment script, a venv with kvpress 0.5.5 and transformers<5.3,
under the git-ignored .peers/kvpress-venv), from the repository root:

    bash tools/peers/kvpress-env.sh .peers/kvpress-venv
    .peers/kvpress-venv/bin/python tools/conformance/dump_kvpress.py

Writes, under tests/fixtures/kvpress/:
    models/<family>/     tiny random models of the first fixtures (llama, qwen3; config.json, model.safetensors)
    <family>.json        kept KV indices per press x ratio x mode x layer x KV head
    models/<shape>/      8 more tiny models (SHAPES: Llama g = 1, 3, 4, 8, Mistral, Mistral MQA, Qwen2, Qwen2
                         + YaRN; 2 layers, weights stored in float16), each with a byte-level tokenizer
    shapes.json          kept KV entries (bitmaps) on those shapes, 90 .. 5000 tokens, cr 0.1 .. 0.9
    generations.json     greedy tokens of kvpress's own KVPressTextGenerationPipeline on 4 of the shapes

The output is deterministic: re-running on the same machine reproduces every file byte for byte (single CPU
thread, fixed seeds, models re-initialised from our own generator, JSON with sorted keys); on another CPU the
last digits of `cut_gap` can differ, the kept sets and generated tokens do not. `--out DIR` writes the same tree
under DIR instead of the repository (for the reproducibility check in tools/conformance/README.md).

How the kept set is obtained: each case prefills the saved model under `with press(model):` exactly as
kvpress's pipeline does (`model.model(input_ids=ids, past_key_values=DynamicCache())`), then matches every row
of the compressed cache's keys to the rows of an uncompressed prefill of the same ids (exact equality; the
press does not change the forward pass, only the cache left behind). AdaKV does not prune, it records
`module.masked_key_indices`; kept = not masked. The press's scores are captured by wrapping `press.score`
and used (a) to cross-check the kept sets and (b) to report ties at the cut and the score gap at the cut.
See tools/conformance/KVPRESS_NOTES.md for what each press does.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import kvpress  # noqa: E402  (import patches transformers' attention functions, as in real kvpress use)
from kvpress import (  # noqa: E402
    AdaKVPress,
    ExpectedAttentionPress,
    KnormPress,
    ObservedAttentionPress,
    PyramidKVPress,
    ScorerPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)

SEED = 20240607
CONTEXT_LEN = 200
QUESTION_LEN = 20
VOCAB = 512
RATIOS = [0.25, 0.5, 0.75]
COMMAND = ".peers/kvpress-venv/bin/python tools/conformance/dump_kvpress.py"
FIXTURE_DIR = Path("tests/fixtures/kvpress")
# std of the re-initialised linear/embedding weights: large enough that attention is far from uniform,
# so scores are well separated (0.02, transformers' default, gives near-uniform attention and near-ties).
WEIGHT_STD = 0.2

COMMON_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(rope_theta=10000.0)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(rope_theta=10000.0)),
}


def press_factories():
    """(name, attn_implementation, factory(compression_ratio)) in fixture order. All other params at defaults."""
    return [
        ("StreamingLLMPress", "sdpa", lambda cr: StreamingLLMPress(compression_ratio=cr)),
        ("SnapKVPress", "sdpa", lambda cr: SnapKVPress(compression_ratio=cr)),
        ("TOVAPress", "sdpa", lambda cr: TOVAPress(compression_ratio=cr)),
        ("KnormPress", "sdpa", lambda cr: KnormPress(compression_ratio=cr)),
        ("ExpectedAttentionPress", "sdpa", lambda cr: ExpectedAttentionPress(compression_ratio=cr)),
        ("ObservedAttentionPress", "eager", lambda cr: ObservedAttentionPress(compression_ratio=cr)),
        ("PyramidKVPress", "sdpa", lambda cr: PyramidKVPress(compression_ratio=cr)),
        ("AdaKVPress(SnapKVPress)", "sdpa", lambda cr: AdaKVPress(press=SnapKVPress(compression_ratio=cr))),
    ]


def press_params(press) -> dict:
    """Every dataclass field of the press except compression_ratio (recorded separately)."""
    out = {}
    for f in dataclasses.fields(press):
        if f.name == "compression_ratio":
            continue
        v = getattr(press, f.name)
        if isinstance(v, ScorerPress):
            out[f.name] = {"class": type(v).__name__, "params": press_params(v)}
        else:
            out[f.name] = v
    return out


# ----------------------------------------------------------------------------------------------------------
# model and inputs


def build_model(family: str, model_dir: Path) -> None:
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**COMMON_CONFIG, **extra)
    _save_random_model(model_cls, config, SEED + (0 if family == "llama" else 1), model_dir, zero_bias=True)


def _save_random_model(model_cls, config, seed: int, model_dir: Path, zero_bias: bool,
                       stored: torch.dtype = torch.float32) -> None:
    """A ``model_cls(config)`` with every weight re-drawn from ``Generator(seed)`` (see the README's "Inputs"),
    saved to ``model_dir`` in ``stored`` (both sides load it as float32)."""
    torch.manual_seed(SEED)
    model = model_cls(config).to(torch.float32)
    # Re-initialise from our own generator in sorted-name order, so the weights depend on nothing but the seed.
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            t = state[name]
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                # Qwen3 per-head QK RMSNorm: a wide spread, as in trained models, so key norms differ (Knorm)
                t.copy_(torch.exp(0.5 * torch.randn(t.shape, generator=gen)))
            elif name.endswith("norm.weight"):  # RMSNorm weights (input/post-attn/final)
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=gen))
            elif name.endswith("bias") and zero_bias:
                t.zero_()
            else:
                t.copy_(WEIGHT_STD * torch.randn(t.shape, generator=gen))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    model.to(stored).save_pretrained(str(model_dir))


def load_model(model_dir: Path, attn: str):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation=attn)
    model.eval()
    return model


def make_inputs() -> tuple[list[int], list[int]]:
    gen = torch.Generator().manual_seed(SEED)
    # ids 3.. avoid pad/bos/eos; context starts with bos like kvpress's pipeline without a chat template
    ctx = [COMMON_CONFIG["bos_token_id"]] + torch.randint(3, VOCAB, (CONTEXT_LEN - 1,), generator=gen).tolist()
    q = torch.randint(3, VOCAB, (QUESTION_LEN,), generator=gen).tolist()
    return ctx, q


# ----------------------------------------------------------------------------------------------------------
# running a press


@torch.no_grad()
def prefill(model, ids: list[int], press=None):
    cache = DynamicCache()
    x = torch.tensor([ids], dtype=torch.long)
    if press is None:
        model.model(input_ids=x, past_key_values=cache)
    else:
        with press(model):
            model.model(input_ids=x, past_key_values=cache)
    return cache


def capture_scores(press):
    """Wrap the (inner) press's score(): store the returned tensor per layer.

    The stored tensor is the very object returned, so for AdaKV it ends up holding the scores *after*
    AdaKV's in-place safeguard scatter (what its global bottom-k actually ranks); a clone before that is kept too.
    """
    inner = press.press if isinstance(press, AdaKVPress) else press
    record = {}
    orig = inner.score

    def wrapped(module, *args, **kwargs):
        s = orig(module, *args, **kwargs)
        record[module.layer_idx] = {"raw": s.detach().clone(), "final": s}
        return s

    inner.score = wrapped
    return record


def match_rows(full: torch.Tensor, kept: torch.Tensor) -> list[int]:
    """Indices i such that full[i] == kept[j] (exact), for each row j of kept; must be unique."""
    eq = (kept[:, None, :] == full[None, :, :]).all(-1)  # (n_kept, k_len)
    counts = eq.sum(-1)
    if not bool((counts == 1).all()):
        raise RuntimeError(f"ambiguous/missing key row match: counts {counts.tolist()}")
    return eq.int().argmax(-1).tolist()


def match_rerotated(full_k: torch.Tensor, full_v: torch.Tensor, kept_k: torch.Tensor, kept_v: torch.Tensor,
                    inv_freq: torch.Tensor) -> tuple[list[int], list[int]]:
    """Positions of the rows of a re-rotated cache (row j holds the entry of position p_j, its key rotated from
    p_j to j): the position whose value equals row j's and whose key, rotated by j - p, equals row j's key, and
    the positions that stay ambiguous. Layer 0 holds the same entry for every occurrence of a token once
    re-rotated (R(j - p) R(p) k = R(j) k), so there the row is the first candidate after the previous row's, and
    all its candidates are reported ambiguous (near ties: either side may keep any of them)."""
    out, ambiguous = [], []
    for j in range(kept_k.shape[0]):
        cands = torch.nonzero((full_v == kept_v[j]).all(-1)).flatten().tolist()
        hits = []
        for p in cands:
            ang = (j - p) * inv_freq.float()
            ang = torch.cat((ang, ang))
            k = full_k[p].float()
            half = k.shape[-1] // 2
            rot = k * ang.cos() + torch.cat((-k[half:], k[:half])) * ang.sin()
            if torch.allclose(rot, kept_k[j].float(), atol=1e-4, rtol=1e-4):
                hits.append(p)
        later = [h for h in hits if not out or h > out[-1]]
        if not later:
            raise RuntimeError(f"re-rotated row {j}: no matching position among {cands}")
        out.append(later[0])
        if len(hits) > 1:
            ambiguous += hits
    return out, sorted(set(ambiguous))


NEAR_TIE_RTOL = 1e-5


def cut_stats(scores: torch.Tensor, n_kept: int) -> tuple[list[int], list[int], float | None]:
    """For a 1-D score vector and a top-n_kept selection (as torch.topk makes it), return

    ties       indices whose score equals the score at the cut, when the cut splits that group
               (then torch.topk's tie-breaking chose); [] when the cut is unambiguous;
    near_ties  superset of ties: kept indices with score <= first_dropped + 2*tol and dropped indices
               with score >= last_kept - 2*tol, when last_kept - first_dropped <= 2*tol, where
               tol = NEAR_TIE_RTOL * max(|last_kept|, |first_dropped|): the entries whose side of the cut
               can flip under float rounding differences (e.g. keys of repeated tokens in layer 0 have
               equal norms in exact arithmetic); [] otherwise;
    gap        last_kept - first_dropped (None if nothing is dropped).
    """
    n = scores.numel()
    if n_kept >= n or n_kept <= 0:
        return [], [], None
    s = scores.double()
    order = torch.sort(s, descending=True, stable=True)
    srt = order.values
    last_kept, first_dropped = srt[n_kept - 1], srt[n_kept]
    gap = float(last_kept - first_dropped)
    ties = torch.nonzero(s == last_kept).flatten().tolist() if gap == 0.0 else []
    tol = NEAR_TIE_RTOL * float(max(abs(last_kept), abs(first_dropped)))
    near = []
    if gap <= 2 * tol:
        near = torch.nonzero((s <= first_dropped + 2 * tol) & (s >= last_kept - 2 * tol)).flatten().tolist()
        near = sorted(set(near) | set(ties))
    return ties, near, gap


def fmt_gap(g: float | None):
    return None if g is None else float(f"{g:.6e}")


def run_case(model, full_keys, ids, name, factory, cr, attn):
    press = factory(cr)
    record = capture_scores(press)
    cache = prefill(model, ids, press)
    layers = model.model.layers
    k_len = len(ids)
    kept, ties, near_ties, gaps = [], [], [], []
    for li in range(len(layers)):
        fk = full_keys[li][0]  # (H, k_len, d)
        ck = cache.layers[li].keys[0]
        H = fk.shape[0]
        sc = record[li]
        if isinstance(press, AdaKVPress):
            assert ck.shape[1] == k_len, "AdaKV must not prune"
            assert torch.equal(ck, fk)
            b, h, s = layers[li].self_attn.masked_key_indices
            mask = torch.ones(H, k_len, dtype=torch.bool)
            mask[h, s] = False
            layer_kept = [torch.nonzero(mask[hh]).flatten().tolist() for hh in range(H)]
            n_kept_head = kvpress.utils.compute_n_kept(k_len, cr)
            assert sum(len(k) for k in layer_kept) == H * n_kept_head
            # global cut: top H*n_kept over the flattened post-safeguard scores
            final = sc["final"][0]
            t_glob, n_glob, g = cut_stats(final.reshape(-1), H * n_kept_head)
            lt = [set() for _ in range(H)]
            ln = [set() for _ in range(H)]
            for flat in t_glob:
                lt[flat // k_len].add(flat % k_len)
            for flat in n_glob:
                ln[flat // k_len].add(flat % k_len)
            # each head's safeguard cut (top n_safe of the raw scores get finfo.max). A tie there only
            # matters if the tied value could be pruned by the global cut: which tied entries get finfo.max
            # does not change the multiset of final scores, hence not the global threshold, so a tied value
            # strictly above the largest pruned score is kept whichever entries were safeguarded.
            n_safe = int(n_kept_head * press.alpha_safeguard)
            if press.alpha_safeguard > 0:
                n_safe = max(1, n_safe) if n_kept_head > 0 else 0
            n_pruned = H * (k_len - n_kept_head)
            max_pruned = float(torch.sort(final.reshape(-1).double()).values[n_pruned - 1]) if n_pruned else None
            for hh in range(H):
                raw = sc["raw"][0, hh].double()
                t_safe, n_safe_near, _ = cut_stats(raw, n_safe)
                if max_pruned is None:
                    continue
                tol = NEAR_TIE_RTOL * abs(max_pruned)
                if t_safe and float(raw[t_safe[0]]) <= max_pruned:
                    lt[hh].update(t_safe)
                if n_safe_near and float(raw[n_safe_near].min()) <= max_pruned + 2 * tol:
                    ln[hh].update(n_safe_near)
            kept.append(layer_kept)
            ties.append([sorted(t) for t in lt])
            near_ties.append([sorted(t) for t in ln])
            gaps.append(fmt_gap(g))
            continue
        layer_kept, layer_ties, layer_near, layer_gaps = [], [], [], []
        for hh in range(H):
            idx = sorted(match_rows(fk[hh], ck[hh]))
            s = sc["raw"][0, hh]
            t, nt, g = cut_stats(s, len(idx))
            # cross-check: every index strictly above the cut is kept, every one strictly below is dropped
            thr = torch.sort(s.double(), descending=True).values[len(idx) - 1]
            above = set(torch.nonzero(s.double() > thr).flatten().tolist())
            at = set(torch.nonzero(s.double() == thr).flatten().tolist())
            assert above <= set(idx) <= above | at, f"{name} cr={cr} layer {li} head {hh}: kept != top-k of scores"
            layer_kept.append(idx)
            layer_ties.append(t)
            layer_near.append(nt)
            layer_gaps.append(fmt_gap(g))
        kept.append(layer_kept)
        ties.append(layer_ties)
        near_ties.append(layer_near)
        gaps.append(layer_gaps)
    return press, kept, ties, near_ties, gaps


def dump_family(family: str, root: Path, ctx: list[int], q: list[int]) -> dict:
    model_dir_rel = FIXTURE_DIR / "models" / family
    model_dir = root / model_dir_rel
    build_model(family, model_dir)
    models = {attn: load_model(model_dir, attn) for attn in ("sdpa", "eager")}
    cases = []
    for query_aware in (False, True):
        ids = ctx + q if query_aware else ctx
        full = {}
        for attn, m in models.items():
            c = prefill(m, ids)
            full[attn] = [c.layers[i].keys.clone() for i in range(len(m.model.layers))]
        for name, attn, factory in press_factories():
            for cr in RATIOS:
                press, kept, ties, near_ties, gaps = run_case(models[attn], full[attn], ids, name, factory, cr, attn)
                cases.append(
                    {
                        "press": name,
                        "params": press_params(press),
                        "compression_ratio": cr,
                        "query_aware": query_aware,
                        "attn_implementation": attn,
                        "k_len": len(ids),
                        "kept": kept,
                        "ties": ties,
                        "near_ties": near_ties,
                        "cut_gap": gaps,
                    }
                )
                print(
                    f"{family:6s} {name:24s} cr={cr:<5} aware={int(query_aware)} "
                    f"kept/layer={[sum(len(h) for h in l) for l in kept]} "
                    f"ties={sum(len(t) for l in ties for t in l)} "
                    f"near={sum(len(t) for l in near_ties for t in l)}",
                    file=sys.stderr,
                )
    cfg = json.loads((model_dir / "config.json").read_text())
    meta = {
        **_provenance(),
        "seed": SEED,
        "model_dir": model_dir_rel.as_posix(),
        "model_class": cfg["architectures"][0],
        "model_config": {k: cfg[k] for k in sorted(COMMON_CONFIG) if k in cfg},
        "dtype": "float32",
        "input_ids": {"context": ctx, "question": q},
        "ratios": RATIOS,
        "modes": {
            "query_aware=false": "press active during prefill of the context ids only (kvpress pipeline default)",
            "query_aware=true": "press active during one prefill of context ids + question ids",
        },
        "kept": "kept[layer][kv_head] = sorted token positions (0-based, into the prefilled ids) left in the cache",
        "ties": "ties[layer][kv_head] = positions whose score equals the score at the cut when the cut splits "
        "that tied group (choice made by torch.topk tie-breaking); [] if unambiguous. AdaKV: global cut over "
        "all heads plus each head's alpha_safeguard top-k cut",
        "near_ties": "superset of ties: positions whose side of the cut could flip under float rounding "
        f"(scores within 2*{NEAR_TIE_RTOL}*|score at cut| of the cut, listed only when the gap at the cut is "
        "that small); same layout as ties",
        "cut_gap": "min kept score - max dropped score, per layer and kv head (per layer for AdaKV: global "
        "cut); 0.0 with ties, null if nothing is dropped",
    }
    return {"meta": meta, "cases": cases}


# ----------------------------------------------------------------------------------------------------------
# more model shapes (shapes.json): families, GQA ratios, MQA, YaRN, non-round lengths, cr 0.1 .. 0.9

SHAPES_FILE = "shapes.json"
GENERATIONS_FILE = "generations.json"
SHAPE_VOCAB = 260  # <pad> <s> </s> + 256 bytes (the byte-level tokenizer saved with each model) + 1 unused
SHAPE_QUESTION_LEN = 20
SHAPE_COMMON = {
    **{k: COMMON_CONFIG[k] for k in ("rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")},
    **dict(vocab_size=SHAPE_VOCAB, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=8192,
           tie_word_embeddings=True),
}
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "rope_theta": 10000.0}
# name: (config class, model class, shape); g = num_attention_heads / num_key_value_heads
SHAPES = {
    "llama_g1": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                                                     head_dim=8, rope_parameters=ROPE)),
    "llama_g3": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                                     head_dim=8, rope_parameters=ROPE)),
    "llama_g4": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                                     head_dim=8, rope_parameters=ROPE)),
    "llama_g8": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=64, num_attention_heads=16, num_key_value_heads=2,
                                                     head_dim=8, rope_parameters=ROPE)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                        head_dim=16, sliding_window=None, rope_parameters=ROPE)),
    "mistral_mqa": (MistralConfig, MistralForCausalLM, dict(hidden_size=64, num_attention_heads=8,
                                                            num_key_value_heads=1, head_dim=8, sliding_window=None,
                                                            rope_parameters=ROPE)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                  head_dim=16, rope_parameters=ROPE)),
    "qwen2_yarn": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                       head_dim=16, rope_parameters=YARN)),
}
# Prefill lengths (tokens under the press). Query-aware: context (L - 20) + question (20) = L.
AGNOSTIC_LENGTHS = (100, 333, 1000)
AWARE_LENGTHS = (90, 330, 1000)  # 90 and 330: kvpress keeps one token fewer than floor at cr 0.3
# Each (shape, press, length, mode) runs one set, in rotation: every cr 0.1 .. 0.9 on every shape and press.
RATIO_SETS = ((0.1, 0.3, 0.6, 0.9), (0.2, 0.4, 0.7, 0.9), (0.3, 0.5, 0.8, 0.9))
# Long prefills, query-agnostic, every press but ObservedAttention (eager L x L weights): length -> ratios
LONG_LENGTHS = {2500: (0.3, 0.9), 5000: (0.8,)}
LONG_SHAPES = ("mistral_mqa", "qwen2_yarn")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what tokenizers' ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def save_byte_tokenizer(model_dir: Path) -> None:
    """A byte-level tokenizer (id = 3 + byte, no merges; <pad> 0, <s> 1, </s> 2), saved with the model so both
    environments tokenise identically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: 3 + b for b, ch in sorted(bytes_to_unicode().items())})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=1_000_000)
    fast.save_pretrained(str(model_dir))


def build_shape(name: str, model_dir: Path) -> None:
    config_cls, model_cls, shape = SHAPES[name]
    config = config_cls(**SHAPE_COMMON, **shape)
    seed = SEED + 100 + sorted(SHAPES).index(name)
    # Qwen2: random q/k/v biases; stored in float16 (half the bytes), run in float32
    _save_random_model(model_cls, config, seed, model_dir, zero_bias=False, stored=torch.float16)
    save_byte_tokenizer(model_dir)


def make_stream() -> tuple[list[int], list[int]]:
    """bos + 4999 ids uniform over the 256 byte ids, and a 20-id question; every case takes a prefix."""
    gen = torch.Generator().manual_seed(SEED + 7)
    n = max(max(AGNOSTIC_LENGTHS), max(AWARE_LENGTHS), max(LONG_LENGTHS))
    stream = [SHAPE_COMMON["bos_token_id"]] + torch.randint(3, 259, (n - 1,), generator=gen).tolist()
    question = torch.randint(3, 259, (SHAPE_QUESTION_LEN,), generator=gen).tolist()
    return stream, question


def shape_ids(stream: list[int], question: list[int], length: int, query_aware: bool) -> list[int]:
    return stream[: length - len(question)] + question if query_aware else stream[:length]


def mask_b64(positions: list[int], n: int) -> str:
    """Kept positions of ``n`` as base64 of a bitmap: byte i // 8, bit i % 8 (least significant first) set =
    position i kept (decode: ``numpy.unpackbits(..., bitorder="little")[:n]``)."""
    if not positions:
        return ""
    bits = bytearray((n + 7) // 8)
    for i in positions:
        bits[i // 8] |= 1 << (i % 8)
    return base64.b64encode(bytes(bits)).decode("ascii")


def shape_groups(name: str):
    """(query_aware, length, press index, ratios) of one shape, in fixture order."""
    si = sorted(SHAPES).index(name)
    n_press = len(press_factories())
    for query_aware, lengths in ((False, AGNOSTIC_LENGTHS), (True, AWARE_LENGTHS)):
        for li, length in enumerate(lengths):
            for pi in range(n_press):
                yield query_aware, length, pi, RATIO_SETS[(si + pi + li + 2 * int(query_aware)) % len(RATIO_SETS)]
    if name in LONG_SHAPES:
        for length, ratios in LONG_LENGTHS.items():
            for pi, (press, _, _) in enumerate(press_factories()):
                if press != "ObservedAttentionPress":
                    yield False, length, pi, ratios


def dump_shapes(root: Path, names: list[str]) -> dict:
    stream, question = make_stream()
    factories = press_factories()
    cases, shapes_meta = [], {}
    for name in names:
        model_dir_rel = FIXTURE_DIR / "models" / name
        build_shape(name, root / model_dir_rel)
        models = {attn: load_model(root / model_dir_rel, attn) for attn in ("sdpa", "eager")}
        cfg = json.loads((root / model_dir_rel / "config.json").read_text())
        shapes_meta[name] = {
            "model_dir": model_dir_rel.as_posix(),
            "model_class": cfg["architectures"][0],
            "g": cfg["num_attention_heads"] // cfg["num_key_value_heads"],
            "config": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "head_dim", "rope_parameters", "vocab_size")},
        }
        full: dict = {}
        for query_aware, length, pi, ratios in shape_groups(name):
            press_name, attn, factory = factories[pi]
            ids = shape_ids(stream, question, length, query_aware)
            if (query_aware, length, attn) not in full:
                c = prefill(models[attn], ids)
                full[(query_aware, length, attn)] = [c.layers[i].keys.clone() for i in range(len(c.layers))]
            for cr in ratios:
                press, kept, ties, near_ties, gaps = run_case(models[attn], full[(query_aware, length, attn)], ids,
                                                              press_name, factory, cr, attn)
                cases.append({
                    "shape": name,
                    "press": press_name,
                    "params": press_params(press),
                    "compression_ratio": cr,
                    "query_aware": query_aware,
                    "attn_implementation": attn,
                    "k_len": len(ids),
                    "n_kept": [[len(h) for h in layer] for layer in kept],
                    "kept_mask": [[mask_b64(h, len(ids)) for h in layer] for layer in kept],
                    "ties_mask": [[mask_b64(h, len(ids)) for h in layer] for layer in ties],
                    "near_ties_mask": [[mask_b64(h, len(ids)) for h in layer] for layer in near_ties],
                    "cut_gap": gaps,
                })
            print(f"{name:11s} {press_name:24s} L={length:<5} aware={int(query_aware)} crs={list(ratios)} "
                  f"n_kept(layer 0, head 0)={[c['n_kept'][0][0] for c in cases[-len(ratios):]]}", file=sys.stderr)
        full.clear()
    meta = {
        **_provenance(),
        "seed": SEED,
        "shapes": shapes_meta,
        "common_config": {k: v for k, v in SHAPE_COMMON.items()},
        "dtype": "float32",
        "input_ids": {"stream": stream, "question": question},
        "lengths": {"query_aware=false": list(AGNOSTIC_LENGTHS), "query_aware=true": list(AWARE_LENGTHS),
                    "long (query_aware=false, shapes " + ", ".join(LONG_SHAPES) + ")":
                        {str(k): list(v) for k, v in LONG_LENGTHS.items()}},
        "ratio_sets": [list(r) for r in RATIO_SETS],
        "modes": {
            "query_aware=false": "press over stream[:k_len]",
            "query_aware=true": "press over stream[:k_len - 20] + question (20 ids)",
        },
        "n_kept": "n_kept[layer][kv_head] = number of entries kvpress left in the cache",
        "kept_mask": "kept_mask[layer][kv_head] = base64 of a bitmap of k_len bits, byte i // 8, bit i % 8 "
        "(least significant first) set = position i (0-based, into the prefilled ids) kept",
        "ties_mask": "the same bitmap of llama.json's ties: positions tied at the cut (torch.topk chose); '' if "
        "unambiguous",
        "near_ties_mask": "the same bitmap of llama.json's near_ties: superset of ties, positions whose side of the "
        "cut float rounding can flip; '' if none",
        "cut_gap": "as in llama.json",
    }
    return {"meta": meta, "cases": cases}


# ----------------------------------------------------------------------------------------------------------
# end-to-end greedy generations with kvpress's own pipeline (generations.json)

GEN_SHAPES = ("llama_g1", "llama_g4", "mistral_mqa", "qwen2_yarn")
GEN_MAX_NEW_TOKENS = 12
GEN_CONTEXT_TOKENS = 1000  # bos + context bytes: a round length, where kvpress's int() and floor differ
# (press or None, compression ratio, query_aware)
GEN_CASES = (
    (None, 0.0, False),
    ("StreamingLLMPress", 0.9, False),
    ("SnapKVPress", 0.8, False),
    ("TOVAPress", 0.6, False),
    ("KnormPress", 0.3, False),
    ("ExpectedAttentionPress", 0.9, False),
    ("ObservedAttentionPress", 0.5, False),
    ("PyramidKVPress", 0.7, False),
    # AdaKV masks keys by a fake key that must have a negative dot product with every query of the step
    # (search_hyperplane); the 41 question queries of a group in head_dim 8 or 16 have none, so AdaKV runs
    # query-aware here, where the step after the press is one token.
    ("AdaKVPress(SnapKVPress)", 0.9, True),
    ("SnapKVPress", 0.9, True),
    ("KnormPress", 0.8, True),
)
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def gen_texts() -> dict[str, str]:
    """Fixed strings: a pseudo-text context of 999 bytes (+ bos = 1000 tokens), a question, and the query-aware
    context (shorter, so that bos + context + question is again 1000 tokens)."""
    gen = torch.Generator().manual_seed(SEED + 11)
    words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (400,), generator=gen)]
    text = " ".join(words)
    question = "What is the word after mike? The word is"
    n = GEN_CONTEXT_TOKENS - 1
    return {"context": text[:n], "question": question, "context_aware": text[: n - len(question)] + question}


def dump_generations(root: Path, names: list[str]) -> dict:
    from kvpress import KVPressTextGenerationPipeline

    factories = {name: (attn, factory) for name, attn, factory in press_factories()}
    texts = gen_texts()
    cases = []
    ids_seen: dict[str, list[int]] = {}
    for shape in names:
        model_dir = root / FIXTURE_DIR / "models" / shape
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        models = {attn: load_model(model_dir, attn) for attn in ("sdpa", "eager")}
        for press_name, cr, query_aware in GEN_CASES:
            attn, factory = factories[press_name] if press_name else ("sdpa", None)
            model = models[attn]
            pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device=torch.device("cpu"))
            captured: dict = {}
            forward, decode = pipe._forward, tokenizer.decode

            def spy_forward(input_tensors, **kwargs):
                captured["context_ids"] = input_tensors["context_ids"][0].tolist()
                captured["question_ids"] = input_tensors["questions_ids"][0][0].tolist()
                return forward(input_tensors, **kwargs)

            def spy_decode(ids, **kwargs):
                captured["generated_ids"] = [int(i) for i in ids]
                return decode(ids, **kwargs)

            margins: list[float] = []

            def on_logits(module, args, out):
                top = out.logits[0, -1].topk(2).values
                margins.append(float(f"{float(top[0] - top[1]):.4e}"))

            pipe._forward, tokenizer.decode = spy_forward, spy_decode
            hook = model.register_forward_hook(on_logits)
            try:
                press = factory(cr) if factory else None
                context = texts["context_aware"] if query_aware else texts["context"]
                question = "" if query_aware else texts["question"]  # kvpress evaluation's compress_questions
                out = pipe(context, question=question, press=press, max_new_tokens=GEN_MAX_NEW_TOKENS)
            finally:
                hook.remove()
                del tokenizer.decode
            mode = "aware" if query_aware else "agnostic"
            for key in ("context_ids", "question_ids"):
                ids_seen.setdefault(f"{mode}_{key}", captured[key])
                assert ids_seen[f"{mode}_{key}"] == captured[key], "the tokenizers of the shapes differ"
            cases.append({
                "shape": shape,
                "press": press_name,
                "params": press_params(press) if press is not None else {},
                "compression_ratio": cr,
                "query_aware": query_aware,
                "attn_implementation": attn,
                "k_len": len(captured["context_ids"]),
                "generated_ids": captured["generated_ids"],
                "answer": out["answer"],
                "margins": margins,
            })
            print(f"{shape:11s} {str(press_name):24s} cr={cr:<4} aware={int(query_aware)} "
                  f"ids={captured['generated_ids']} min margin={min(margins):.3g}", file=sys.stderr)
    assert len(ids_seen["agnostic_context_ids"]) == GEN_CONTEXT_TOKENS
    assert len(ids_seen["aware_context_ids"]) == GEN_CONTEXT_TOKENS
    meta = {
        **_provenance(),
        "shapes": list(names),
        "texts": texts,
        "input_ids": ids_seen,
        "max_new_tokens": GEN_MAX_NEW_TOKENS,
        "pipeline": "KVPressTextGenerationPipeline(model, tokenizer)(context, question=question, press=press, "
        "max_new_tokens=max_new_tokens); no chat template: context ids = bos + context, question ids = question "
        "+ '\\n'. query_aware=true: kvpress evaluation's compress_questions (context = context + question, "
        "question = '', so the ids after the press are just '\\n')",
        "generated_ids": "kvpress's greedy tokens (an eos, if generated, is the last one: kvpress keeps it)",
        "margins": "top-1 minus top-2 logit at each generated token (small = a near-tie, fragile)",
    }
    return {"meta": meta, "cases": cases}


# ----------------------------------------------------------------------------------------------------------
# more presses (extra/<group>.json): one file per group of presses, defined in tools/conformance/presses/<group>.py
# by ``cases()`` -> [{"press", "attn", "factory", "method", "overrides", "topk"[, "run"]}], on the two families
# above (their saved models and input ids), cr 0.25 / 0.5 / 0.75, both modes. Each group file is written alone, so
# adding a press never rewrites the fixtures of the others.

EXTRA_DIR = "extra"
PRESS_GROUPS = Path(__file__).resolve().parent / "presses"


def extra_groups() -> list[str]:
    return sorted(p.stem for p in PRESS_GROUPS.glob("*.py") if not p.stem.startswith("_"))


def _load_group(group: str):
    """A press group's module; its folder is importable, so groups share helpers (``import _wrapped_ties``)."""
    import importlib.util

    if str(PRESS_GROUPS) not in sys.path:
        sys.path.insert(0, str(PRESS_GROUPS))
    spec = importlib.util.spec_from_file_location(f"kvpress_group_{group}", PRESS_GROUPS / f"{group}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _attention_modules(model):
    return [layer.self_attn for layer in model.model.layers]


def generic_params(press) -> dict:
    """A press's parameters: its dataclass fields, or its public attributes for presses with their own __init__
    (CriticalKVPress); nested presses as {"class", "params"}; compression_ratio left out (recorded apart)."""
    from kvpress.presses.base_press import BasePress

    if dataclasses.is_dataclass(press):
        items = [(f.name, getattr(press, f.name)) for f in dataclasses.fields(press)]
    else:
        items = [(k, v) for k, v in vars(press).items() if not k.startswith("_")]
    out = {}
    for name, value in items:
        if name == "compression_ratio":
            continue
        if isinstance(value, BasePress):
            out[name] = {"class": type(value).__name__, "params": generic_params(value)}
        elif isinstance(value, (bool, int, float, str)) or value is None:
            out[name] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            out[name] = list(value)
        else:
            out[name] = type(value).__name__  # tensors, modules: not parameters a reader compares
    return out


def run_extra_case(model, full_keys, ids: list[int], spec: dict, cr: float, full_values=None) -> dict:
    """One (press, ratio, ids) case: prefill under the press (or ``spec["run"](model, ids, press) -> cache``),
    kept rows matched to the uncompressed prefill's keys, or read from ``module.masked_key_indices`` where the
    press masks instead of pruning (AdaKV-style global cuts: ``global_cut`` true). With ``topk`` the press's
    ``score`` is captured: ties / near ties at each head's cut, and a cross-check that kvpress kept its top-k.

    Optional spec keys: ``match: "rerotated"`` matches rows of a cache whose kept keys were re-rotated
    (``match_rerotated``); ``key_channels: true`` records channels 0 and d/2 of every cached key (the fastest and slowest
    rotating pair) in cache order, so the changed keys themselves can be compared; ``layers``: the layers the
    comparison applies to (recorded as ``compare_layers``; e.g. layer 0 only, where a simulation and a real
    chunked prefill see the same keys); ``ties_by_token``: at layer 0 the positions of a token both kept and
    dropped are near ties (a key-norm score ties every occurrence of a token there)."""
    press = spec["factory"](cr)
    record: dict = {}
    if spec.get("topk"):
        orig = press.score

        def wrapped(module, *args, **kwargs):
            s = orig(module, *args, **kwargs)
            record[module.layer_idx] = s.detach().clone()
            return s

        press.score = wrapped
    modules = _attention_modules(model)
    for m in modules:  # a mask left by an earlier case must not be read as this one's
        if hasattr(m, "masked_key_indices"):
            del m.masked_key_indices
    runner = spec.get("run")
    with torch.no_grad():
        cache = runner(model, ids, press) if runner else prefill(model, ids, press)
    k_len = len(ids)
    kept, ties, near_ties, gaps, channels = [], [], [], [], []
    global_cut = False
    for li, module in enumerate(modules):
        fk = full_keys[li][0]
        n_heads = fk.shape[0]
        ck = cache.layers[li].keys[0]
        masked = getattr(module, "masked_key_indices", None)
        if masked is not None:
            global_cut = True
            assert ck.shape[1] == k_len, f"{spec['press']}: masks and prunes"
            _, h, s = masked
            mask = torch.ones(n_heads, k_len, dtype=torch.bool)
            mask[h, s] = False
            layer_kept = [torch.nonzero(mask[hh]).flatten().tolist() for hh in range(n_heads)]
        elif spec.get("match") == "rerotated":
            inv_freq = model.model.rotary_emb.inv_freq
            cv, fv = cache.layers[li].values[0], full_values[li][0]
            matched = [match_rerotated(fk[hh], fv[hh], ck[hh], cv[hh], inv_freq) for hh in range(n_heads)]
            layer_kept = [m[0] for m in matched]
            ambiguous = [m[1] for m in matched]
        else:
            layer_kept = [sorted(match_rows(fk[hh], ck[hh])) for hh in range(n_heads)]
        if spec.get("key_channels"):
            half = ck.shape[-1] // 2
            channels.append([[[float(f"{float(v):.6e}") for v in row] for row in ck[hh][:, [0, half]]]
                             for hh in range(n_heads)])
        layer_ties, layer_near, layer_gaps = [], [], []
        for hh, idx in enumerate(layer_kept):
            if li in record and masked is None:
                s = record[li][0, hh]
                t, nt, g = cut_stats(s, len(idx))
                thr = torch.sort(s.double(), descending=True).values[len(idx) - 1]
                above = set(torch.nonzero(s.double() > thr).flatten().tolist())
                at = set(torch.nonzero(s.double() == thr).flatten().tolist())
                assert above <= set(idx) <= above | at, f"{spec['press']} cr={cr} layer {li} head {hh}: not top-k"
            else:
                t, nt, g = [], [], None
            layer_ties.append(t)
            layer_near.append(nt)
            layer_gaps.append(fmt_gap(g))
        if spec.get("match") == "rerotated":
            layer_near = [sorted(set(n) | set(a)) for n, a in zip(layer_near, ambiguous)]
        if spec.get("ties_by_token") and li == 0:
            # a key-norm score at layer 0 (before any attention): every occurrence of a token has the same key up
            # to its rotation, hence the same norm, so a token kept at one position and dropped at another is an
            # exact tie (which occurrence survives is float rounding)
            for hh, idx in enumerate(layer_kept):
                kept_ids = {ids[i] for i in idx}
                dropped_ids = {ids[i] for i in range(k_len) if i not in set(idx)}
                both = kept_ids & dropped_ids
                layer_near[hh] = sorted(set(layer_near[hh]) | {i for i in range(k_len) if ids[i] in both})
        if spec.get("near_ties"):  # a group's own rule for ties the press broke before its last cut
            layer_near = spec["near_ties"](press, li, layer_kept, layer_near)
        kept.append(layer_kept)
        ties.append(layer_ties)
        near_ties.append(layer_near)
        gaps.append(layer_gaps)
    return {"press": spec["press"], "params": generic_params(press), "compression_ratio": cr,
            "method": spec["method"], "overrides": spec.get("overrides", {}), "attn_implementation": spec["attn"],
            "k_len": k_len, "kept": kept, "ties": ties, "near_ties": near_ties, "cut_gap": gaps,
            "global_cut": global_cut, "scores_checked": bool(record),
            **({"key_channels": channels} if spec.get("key_channels") else {}),
            **({"compare_layers": list(spec["layers"])} if spec.get("layers") is not None else {})}


def dump_extra(root: Path, group: str, ctx: list[int], q: list[int]) -> dict:
    specs = _load_group(group).cases()
    cases = []
    for family in FAMILIES:
        model_dir = root / FIXTURE_DIR / "models" / family
        if not (model_dir / "config.json").exists():
            build_model(family, model_dir)
        models = {attn: load_model(model_dir, attn) for attn in sorted({s["attn"] for s in specs})}
        for query_aware in (False, True):
            ids = ctx + q if query_aware else ctx
            prefilled = {attn: prefill(m, ids).layers for attn, m in models.items()}
            full = {attn: [c.keys.clone() for c in layers] for attn, layers in prefilled.items()}
            full_values = {attn: [c.values.clone() for c in layers] for attn, layers in prefilled.items()}
            for spec in specs:
                for cr in RATIOS:
                    torch.manual_seed(SEED)  # a press that draws from the global generator draws the same
                    case = run_extra_case(models[spec["attn"]], full[spec["attn"]], ids, spec, cr,
                                          full_values[spec["attn"]])
                    cases.append({"family": family, "query_aware": query_aware, **case})
                    print(f"{group:14s} {family:6s} {spec['press']:32s} cr={cr:<5} aware={int(query_aware)} "
                          f"kept/layer={[sum(len(h) for h in l) for l in case['kept']]} "
                          f"near={sum(len(t) for l in case['near_ties'] for t in l)}", file=sys.stderr)
    meta = {
        **_provenance(),
        "command": f"{COMMAND} --extra {group}",
        "group": group,
        "families": {f: (FIXTURE_DIR / "models" / f).as_posix() for f in FAMILIES},
        "input_ids": {"context": ctx, "question": q},
        "ratios": RATIOS,
        "modes": {"query_aware=false": "press active during prefill of the context ids only",
                  "query_aware=true": "press active during one prefill of context ids + question ids"},
        "kept": "kept[layer][kv_head] = sorted positions left in the cache (global_cut: not masked)",
        "method": "kvbench method (conf/method/<method>.yaml) + overrides, with preset=kvpress where it has one",
        "near_ties": "as in llama.json (only where scores_checked: the press keeps the top-k of its score)",
    }
    return {"meta": meta, "cases": cases}


def _provenance() -> dict:
    """What made a fixture: the versions and the command."""
    return {"kvpress_version": _kvpress_version(), "transformers_version": transformers.__version__,
            "torch_version": torch.__version__, "command": COMMAND}


def _kvpress_version() -> str:
    from importlib.metadata import version

    return version("kvpress")


def write_json(path: Path, obj: dict) -> None:
    """Sorted keys; one case per line so diffs stay readable."""
    dumps = lambda o: json.dumps(o, sort_keys=True, separators=(",", ":"))  # noqa: E731
    lines = ["{", '"cases":[']
    cases = obj["cases"]
    for i, c in enumerate(cases):
        lines.append(dumps(c) + ("," if i < len(cases) - 1 else ""))
    lines.append("],")
    lines.append('"meta":' + json.dumps(obj["meta"], sort_keys=True, indent=1))
    lines.append("}")
    text = "\n".join(lines) + "\n"
    json.loads(text)  # valid JSON
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".", help="root to write tests/fixtures/kvpress/ under (default: repo root)")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of llama,qwen3 ('' = none)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {','.join(SHAPES)} "
                    f"for {SHAPES_FILE} ('' = none)")
    ap.add_argument("--no-generations", action="store_true", help=f"do not write {GENERATIONS_FILE}")
    ap.add_argument("--extra", default=None, help="write only extra/<group>.json for these comma-separated groups of "
                    f"tools/conformance/presses/ ('all' = every group); nothing else is rewritten")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    root = Path(args.out)
    (root / FIXTURE_DIR).mkdir(parents=True, exist_ok=True)
    ctx, q = make_inputs()
    if args.extra is not None:
        groups = extra_groups() if args.extra == "all" else [g for g in args.extra.split(",") if g]
        unknown = sorted(set(groups) - set(extra_groups()))
        if unknown:
            ap.error(f"unknown press groups {unknown}; allowed: {', '.join(extra_groups())}")
        (root / FIXTURE_DIR / EXTRA_DIR).mkdir(parents=True, exist_ok=True)
        for group in groups:
            path = root / FIXTURE_DIR / EXTRA_DIR / f"{group}.json"
            write_json(path, dump_extra(root, group, ctx, q))
            print(f"wrote {path}", file=sys.stderr)
        return
    for family in filter(None, args.families.split(",")):
        obj = dump_family(family, root, ctx, q)
        write_json(root / FIXTURE_DIR / f"{family}.json", obj)
        print(f"wrote {root / FIXTURE_DIR / f'{family}.json'}", file=sys.stderr)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        ap.error(f"unknown shapes {unknown}; allowed: {', '.join(SHAPES)}")
    if shapes:
        write_json(root / FIXTURE_DIR / SHAPES_FILE, dump_shapes(root, shapes))
        print(f"wrote {root / FIXTURE_DIR / SHAPES_FILE}", file=sys.stderr)
    if not args.no_generations:
        missing = [s for s in GEN_SHAPES if not (root / FIXTURE_DIR / "models" / s / "config.json").exists()]
        if missing:
            ap.error(f"{GENERATIONS_FILE} needs the models of {', '.join(missing)} (run with those --shapes)")
        write_json(root / FIXTURE_DIR / GENERATIONS_FILE, dump_generations(root, list(GEN_SHAPES)))
        print(f"wrote {root / FIXTURE_DIR / GENERATIONS_FILE}", file=sys.stderr)


if __name__ == "__main__":
    main()
