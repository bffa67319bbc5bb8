"""Dump which KV entries NVIDIA kvpress keeps, as conformance fixtures for kvbench's methods.

Run with the *kvpress* environment's python (kvpress 0.5.5 pins transformers<5.3, so it cannot share
kvbench's .venv), from the repository root:

    bash /work/shared/peers/kvpress-env.sh .peers/kvpress-venv
    .peers/kvpress-venv/bin/python tools/conformance/dump_kvpress.py

Writes, for each model family (llama, qwen3):
    tests/fixtures/kvpress/models/<family>/   tiny random model (config.json, model.safetensors, ...)
    tests/fixtures/kvpress/<family>.json      kept KV indices per press x ratio x mode x layer x KV head

The output is deterministic: re-running reproduces every file byte for byte (single CPU thread, fixed seeds,
models re-initialised from our own generator, JSON with sorted keys). `--out DIR` writes the same tree under
DIR instead of the repository (for the reproducibility check in tools/conformance/README.md).

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
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
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
    torch.manual_seed(SEED)
    model = model_cls(config).to(torch.float32)
    # Re-initialise from our own generator in sorted-name order, so the weights depend on nothing but SEED.
    gen = torch.Generator().manual_seed(SEED + (0 if family == "llama" else 1))
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            t = state[name]
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                # Qwen3 per-head QK RMSNorm: a wide spread, as in trained models, so key norms differ (Knorm)
                t.copy_(torch.exp(0.5 * torch.randn(t.shape, generator=gen)))
            elif name.endswith("norm.weight"):  # RMSNorm weights (input/post-attn/final)
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=gen))
            elif name.endswith("bias"):
                t.zero_()
            else:
                t.copy_(WEIGHT_STD * torch.randn(t.shape, generator=gen))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    model.save_pretrained(str(model_dir))


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
        "kvpress_version": _kvpress_version(),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "command": COMMAND,
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
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of llama,qwen3")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    root = Path(args.out)
    (root / FIXTURE_DIR).mkdir(parents=True, exist_ok=True)
    ctx, q = make_inputs()
    for family in args.families.split(","):
        obj = dump_family(family, root, ctx, q)
        write_json(root / FIXTURE_DIR / f"{family}.json", obj)
        print(f"wrote {root / FIXTURE_DIR / f'{family}.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
