"""Run in kvpress's environment from the repository root (.peers/kvpress-venv/bin/python
tools/conformance/dump_kvpress_decoding.py): what kvpress 0.5.5's ``DecodingPress`` and ``PrefillDecodingPress``
keep while they decode, for tests/test_conformance_decoding.py (decoding.json).

Each case loads a saved tiny fixture model (tests/fixtures/kvpress/models/{llama,qwen3,mistral}, sdpa, float32)
and runs the steps of kvpress's ``KVPressTextGenerationPipeline._forward`` / ``generate_answer`` on fixed ids: the
context prefilled with ``model.model(input_ids=context, past_key_values=cache)`` (under the press for
``PrefillDecodingPress``, outside it for ``DecodingPress``), then, under ``with press(model):``, the question as
one forward at positions ``len(context) ..``, then one greedy token per forward. The only change to
``generate_answer`` is that an EOS does not stop the loop (every case runs ``MAX_NEW_TOKENS`` tokens; the test
turns kvbench's EOS stop off alike).

Recorded after each compression event (every cut of a layer's cache, in the order kvpress makes them), per layer
and KV head: the positions held in the cache after the cut, the cache lengths before and after, and the positions
whose side of the cut float rounding can flip (``near_ties``, from the press's own scores, as in dump_kvpress.py);
and the generated tokens with their top-1 minus top-2 logit margins.

How the positions are recovered. kvpress does not sort the kept indices (``scores.topk(n).indices``), so after its
first cut the cache is in score order. Matching rows to an uncompressed run of the same tokens (dump_kvpress.py's
way) works only for the prefill and for layer 0: once a cache is cut, every later token's hidden states, hence its
keys above layer 0, differ from the uncompressed run's. So each cut is read where it happens: ``compress`` is
wrapped, every row of the cut cache is matched (exactly) to a row of the cache it was cut from, and positions are
carried along (the cache grows at its end by one entry per token fed, at consecutive positions). At the end, the
layer-0 positions so tracked are checked against an uncompressed forward of the whole sequence (nearest key row
within 1e-4).

Two variants per case: ``kvpress`` (as shipped) and ``kvpress_sorted``: the same press with each cut's kept rows
put back in position order (a patch of this script, not of kvpress), which is what kvbench does. Their
difference isolates what the cache order changes (SnapKV's avg-pool and StreamingLLM's index-based score read the
cache order; Knorm does not): see tools/conformance/KVPRESS_NOTES.md, "DecodingPress".

Deterministic (one thread, fixed ids): ``--out DIR`` writes the same file under DIR, byte for byte on one machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dump_kvpress import (FIXTURE_DIR, SEED, _provenance, cut_stats, load_model, mask_b64,  # noqa: E402
                          match_rows, write_json)
from kvpress import DecodingPress, KnormPress, PrefillDecodingPress, SnapKVPress, StreamingLLMPress  # noqa: E402
from transformers import DynamicCache  # noqa: E402

OUT = FIXTURE_DIR / "decoding.json"
COMMAND = ".peers/kvpress-venv/bin/python tools/conformance/dump_kvpress_decoding.py"
MODELS = ("llama", "qwen3", "mistral")
CONTEXT_LEN = 192  # bos + 191 ids: PrefillDecodingPress at cr 0.5 keeps 96 = the decoding target of setting B
MAX_NEW_TOKENS = 160
PREFILL_CR = 0.5
# (name, compression_interval, target_size, hidden_states_buffer_size)
SETTINGS = {
    "A": (16, 48, 32),  # many cuts (10 in 160 tokens), the cache between 48 and 64 entries
    "B": (40, 96, 32),  # 4 cuts; buffer < interval: kvpress scores with buffer + 1 hidden states
    "W64": (72, 96, 64),  # SnapKV's own window 64 (kvbench's preset): needs more than 64 buffered queries; 2 cuts
}
SNAP_WINDOW_SMALL = 12  # SnapKV in settings A and B, both sides (kvpress asserts buffered queries > window)


def base_press(press: str, setting: str):
    """The scoring press with kvpress's defaults (kvbench's method.preset=kvpress), SnapKV's window set as the
    setting needs."""
    if press == "KnormPress":
        return KnormPress()
    if press == "StreamingLLMPress":
        return StreamingLLMPress()
    if press == "SnapKVPress":
        return SnapKVPress() if setting == "W64" else SnapKVPress(window_size=SNAP_WINDOW_SMALL)
    raise ValueError(press)


def case_list(model_name: str) -> list[dict]:
    """Every (press, mode, setting, question length) of a model's cases, in order."""
    cases = []
    for press in ("KnormPress", "StreamingLLMPress", "SnapKVPress"):
        decode_settings = ("W64", "A") if press == "SnapKVPress" else ("A", "B")
        for setting in decode_settings:
            cases.append({"press": press, "mode": "decode", "setting": setting, "question_len": 1})
        cases.append({"press": press, "mode": "both", "setting": "W64" if press == "SnapKVPress" else "B",
                      "question_len": 1})
    if model_name != MODELS[0]:
        return cases
    # kvpress counts a multi-token question as one step of its interval (kvbench counts its entries): the schedule
    # difference, on Knorm (the cut itself does not read the queries)
    cases.append({"press": "KnormPress", "mode": "decode", "setting": "A", "question_len": 6})
    # PrefillDecodingPress with a target below its prefill's budget (kvbench lowers the prefill to the target)
    cases.append({"press": "KnormPress", "mode": "both", "setting": "A", "question_len": 1})
    return cases


def make_press(case: dict):
    interval, target, buffer = SETTINGS[case["setting"]]
    decoding = DecodingPress(base_press=base_press(case["press"], case["setting"]), compression_interval=interval,
                             target_size=target, hidden_states_buffer_size=buffer)
    if case["mode"] == "decode":
        return decoding
    prefilling = base_press(case["press"], case["setting"])
    prefilling.compression_ratio = PREFILL_CR
    return PrefillDecodingPress(prefilling_press=prefilling, decoding_press=decoding)


def make_ids(model_name: str, vocab: int, n_question: int) -> tuple[list[int], list[int]]:
    """bos + 191 ids and a question, uniform over ids 3 .. vocab - 2 (no pad / bos / eos)."""
    gen = torch.Generator().manual_seed(SEED + 31 + MODELS.index(model_name))
    ctx = [1] + torch.randint(3, vocab - 1, (CONTEXT_LEN - 1,), generator=gen).tolist()
    return ctx, torch.randint(3, vocab - 1, (n_question,), generator=gen).tolist()


class Tracker:
    """The positions each (layer, KV head) of the cache holds, in cache order, carried through every cut."""

    def __init__(self, n_layers: int, sort_kept: bool):
        self.pos: list[list[list[int]] | None] = [None] * n_layers
        self.cut_layers: set[int] = set()  # layers cut at least once (their first cut records the cache order)
        self.appended = [0] * n_layers  # positions below this have been written to the layer's cache
        self.current = -1  # position of the last token of the forward in progress
        self.sort_kept = sort_kept
        self.events: list[dict] = []
        self.scores: dict[int, torch.Tensor] = {}

    def wrap_score(self, press) -> None:
        orig = press.score

        def score(module, *args, **kwargs):
            s = orig(module, *args, **kwargs)
            self.scores[module.layer_idx] = s.detach().clone()
            return s

        press.score = score

    def wrap_compress(self, press, phase: str) -> None:
        orig = press.compress

        def compress(module, hidden_states, keys, values, attentions, kwargs):
            layer = module.layer_idx
            self.scores.pop(layer, None)
            new_keys, new_values = orig(module, hidden_states, keys, values, attentions, kwargs)
            return self._cut(layer, phase, keys, new_keys, new_values)

        press.compress = compress

    def grow(self, layer: int, n_heads: int, length: int) -> list[list[int]]:
        """The layer's positions once its cache holds ``length`` entries (new ones at consecutive positions)."""
        if self.pos[layer] is None:
            self.pos[layer] = [[] for _ in range(n_heads)]
        added = length - len(self.pos[layer][0])
        fresh = list(range(self.appended[layer], self.appended[layer] + added))
        self.appended[layer] += added
        self.pos[layer] = [p + fresh for p in self.pos[layer]]
        return self.pos[layer]

    def _cut(self, layer: int, phase: str, keys, new_keys, new_values):
        n_heads = keys.shape[1]
        before = self.grow(layer, n_heads, keys.shape[2])
        if new_keys.shape[2] == keys.shape[2]:  # the layer held no more than the target: nothing cut
            return new_keys, new_values
        after, near, order = [], [], []
        scores = self.scores.get(layer)
        for h in range(n_heads):
            rows = match_rows(keys[0, h], new_keys[0, h])
            held = [before[h][i] for i in rows]
            _, near_idx, _ = cut_stats(scores[0, h], len(rows))
            after.append(held)
            near.append(sorted(before[h][i] for i in near_idx))
            order.append(sorted(range(len(rows)), key=held.__getitem__))
        if self.sort_kept:  # kvbench's cache order: kept entries in position order
            index = torch.tensor(order)[None, :, :, None].expand_as(new_keys)
            new_keys, new_values = new_keys.gather(2, index), new_values.gather(2, index)
            after = [sorted(a) for a in after]
        self.pos[layer] = after
        event = {"phase": phase, "layer": layer, "position": self.current,
                 "len_before": [len(b) for b in before], "len_after": [len(a) for a in after],
                 "kept": [sorted(a) for a in after], "near_ties": near,
                 "cache_order_sorted": all(a == sorted(a) for a in after)}
        if not self.sort_kept and layer not in self.cut_layers:  # the order the next cut scores the old entries in
            event["order"] = after
            self.cut_layers.add(layer)
        self.events.append(event)
        return new_keys, new_values


@torch.no_grad()
def run(model, ctx: list[int], question: list[int], press, tracker: Tracker) -> tuple[list[int], list[float], object]:
    """kvpress's pipeline steps (``_forward`` and ``generate_answer``) on fixed ids; returns the generated tokens,
    their logit margins and the final cache."""
    cache = DynamicCache()
    context = torch.tensor([ctx])
    if isinstance(press, PrefillDecodingPress):
        tracker.current = len(ctx) - 1
        with press(model):
            model.model(input_ids=context, past_key_values=cache)
    else:
        model.model(input_ids=context, past_key_values=cache)
    for layer in range(len(cache.layers)):
        if tracker.pos[layer] is None:  # not cut during the prefill
            tracker.grow(layer, cache.layers[layer].keys.shape[1], cache.layers[layer].keys.shape[2])
    tokens, margins = [], []

    def pick(logits):
        top = logits[0, -1].topk(2)
        margins.append(float(f"{float(top.values[0] - top.values[1]):.3g}"))
        tokens.append(int(top.indices[0]))

    with press(model):
        positions = torch.arange(len(ctx), len(ctx) + len(question))[None]
        tracker.current = int(positions[0, -1])
        out = model(input_ids=torch.tensor([question]), past_key_values=cache, position_ids=positions,
                    logits_to_keep=1)
        pick(out.logits)
        next_position = int(positions[0, -1]) + 1
        for i in range(MAX_NEW_TOKENS - 1):
            tracker.current = next_position + i
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                        position_ids=torch.tensor([[next_position + i]]))
            pick(out.logits)
    return tokens, margins, cache


@torch.no_grad()
def check_layer0(model, ids: list[int], cache, tracker: Tracker) -> None:
    """Layer 0's keys depend only on the token and its position: every tracked position's key is the
    uncompressed run's key at that position (up to float rounding of a one-token forward)."""
    full = DynamicCache()
    model.model(input_ids=torch.tensor([ids]), past_key_values=full)
    positions = tracker.grow(0, cache.layers[0].keys.shape[1], cache.layers[0].keys.shape[2])
    for h, held in enumerate(positions):
        keys, ref = cache.layers[0].keys[0, h], full.layers[0].keys[0, h]
        nearest = torch.cdist(keys, ref).argmin(dim=1).tolist()
        assert nearest == held, f"layer 0 head {h}: tracked positions are not the cache's"
        assert float((keys - ref[held]).abs().max()) < 1e-4


def press_params(press) -> dict:
    out = {"class": type(press).__name__}
    for f in dataclasses.fields(press):
        value = getattr(press, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = press_params(value)
        elif isinstance(value, (bool, int, float, str)) or value is None:
            out[f.name] = value
    return out


def dump() -> dict:
    cases, input_ids = [], {}
    for model_name in MODELS:
        model_dir = FIXTURE_DIR / "models" / model_name
        model = load_model(model_dir, "sdpa")  # the saved models are read, never rewritten
        vocab, n_layers = model.config.vocab_size, model.config.num_hidden_layers
        ctx, question = make_ids(model_name, vocab, 6)
        input_ids[model_name] = {"context": ctx, "question": question}
        for spec in case_list(model_name):
            question = input_ids[model_name]["question"][: spec["question_len"]]
            for variant in ("kvpress", "kvpress_sorted"):
                press = make_press(spec)
                tracker = Tracker(n_layers, sort_kept=variant == "kvpress_sorted")
                decoding = press if isinstance(press, DecodingPress) else press.decoding_press
                tracker.wrap_score(decoding.base_press)
                tracker.wrap_compress(decoding, "decode")
                if isinstance(press, PrefillDecodingPress):
                    tracker.wrap_score(press.prefilling_press)
                    tracker.wrap_compress(press.prefilling_press, "prefill")
                tokens, margins, cache = run(model, ctx, question, press, tracker)
                check_layer0(model, ctx + question + tokens[:-1], cache, tracker)
                n_fed = len(ctx) + len(question) + len(tokens) - 1
                events = [{**e, "kept": [mask_b64(h, n_fed) for h in e["kept"]],
                           "near_ties": [mask_b64(h, n_fed) for h in e["near_ties"]]} for e in tracker.events]
                cases.append({"model": model_name, "variant": variant, **spec,
                              "compression_interval": SETTINGS[spec["setting"]][0],
                              "target_size": SETTINGS[spec["setting"]][1],
                              "hidden_states_buffer_size": SETTINGS[spec["setting"]][2],
                              "press_params": press_params(press), "generated": tokens, "margins": margins,
                              "events": events,
                              "final_len": [[int(layer.keys.shape[2])] * int(layer.keys.shape[1])
                                            for layer in cache.layers]})
                near = sum(bool(m) for e in events for m in e["near_ties"])
                print(f"{model_name:8s} {variant:15s} {spec['press']:18s} {spec['mode']:6s} {spec['setting']:4s} "
                      f"q={spec['question_len']} cuts={len(events)} near-tie heads={near} "
                      f"min margin={min(margins):.3g}", file=sys.stderr)
    meta = {
        **_provenance(),
        "command": COMMAND,
        "models": {m: (FIXTURE_DIR / "models" / m).as_posix() for m in MODELS},
        "input_ids": input_ids,
        "question": "a case's question is the first question_len ids of input_ids[model].question",
        "max_new_tokens": MAX_NEW_TOKENS,
        "prefill_compression_ratio": PREFILL_CR,
        "settings": {k: {"compression_interval": v[0], "target_size": v[1], "hidden_states_buffer_size": v[2]}
                     for k, v in SETTINGS.items()},
        "snapkv_window": {"W64": 64, "A": SNAP_WINDOW_SMALL, "B": SNAP_WINDOW_SMALL},
        "steps": "prefill model.model(context) (under the press for PrefillDecodingPress), then under the press "
        "model(question, position_ids=len(context)..) and one greedy token per forward (generate_answer, but an "
        "EOS does not stop it)",
        "events": "every cut, in kvpress's order: phase (prefill|decode), layer, position of the last token of the "
        "forward that cut, len_before / len_after per KV head, kept = base64 bitmap (dump_kvpress.mask_b64) of "
        "the positions held after the cut, over positions 0 .. n_fed - 1 (n_fed = context + question + generated "
        "- 1); near_ties = the same bitmap of positions within float rounding of the cut ('' if none); "
        "cache_order_sorted = whether the cache holds them in position order after the cut; order (a layer's first "
        "cut only) = the positions in cache order after it, per KV head",
        "variants": "kvpress: as shipped; kvpress_sorted: each cut's kept rows put back in position order (this "
        "script's patch, kvbench's order)",
        "generated": "greedy tokens (max_new_tokens), margins = top-1 minus top-2 logit at each",
    }
    return {"meta": meta, "cases": cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".", help="root to write tests/fixtures/kvpress/decoding.json under (the models "
                    "are read from the repository's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    root = Path(args.out)
    path = root / OUT
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, dump())
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
