"""Finch (kvpress FinchPress, one shot): kvbench method finch. kvpress finds the window after a delimiter token,
which its embedding hook removes before the model sees the prompt: the runner inserts one (an id absent from the
prompt) before the question of the query-aware prompt (the 20 question ids, which kvbench's query-aware prefill
names to the scorer) and, query-agnostic, before the last 32 ids (kvbench's ``window`` when there is no question).
``rerotate_keys=False``: re-rotated keys would not match the full prefill's rows, and the kept set is the same."""
import torch

CONTEXT_LEN, FALLBACK_WINDOW = 200, 32  # dump_kvpress's context ids; methods/finch.py's window default


def _run(model, ids, press):
    window = len(ids) - CONTEXT_LEN if len(ids) > CONTEXT_LEN else FALLBACK_WINDOW
    press.delimiter_token_id = next(t for t in range(model.config.vocab_size - 1, -1, -1) if t not in ids)
    with_delimiter = ids[: len(ids) - window] + [press.delimiter_token_id] + ids[len(ids) - window :]
    from transformers import DynamicCache

    cache = DynamicCache()
    with press(model):
        model.model(input_ids=torch.tensor([with_delimiter]), past_key_values=cache)
    assert press.window_size == window
    return cache


def cases():
    from kvpress.presses.finch_press import FinchPress

    return [{"press": "FinchPress", "attn": "sdpa",
             "factory": lambda cr: FinchPress(compression_ratio=cr, rerotate_keys=False),
             "method": "finch", "overrides": {}, "topk": True, "run": _run}]
