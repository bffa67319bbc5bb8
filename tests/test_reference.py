"""The shipped reference model: loads as a standard HF checkpoint, is small, and retrieves; training learns."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from harness.reference import CHECKPOINT_DIR

HAS_CKPT = (CHECKPOINT_DIR / "model.safetensors").exists()
needs_ckpt = pytest.mark.skipif(not HAS_CKPT, reason="reference checkpoint not trained yet")


@needs_ckpt
def test_checkpoint_is_standard_and_small():
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

    size = sum(p.stat().st_size for p in Path(CHECKPOINT_DIR).iterdir() if p.is_file())
    assert size <= 25 * 2**20, f"checkpoint is {size / 2**20:.1f} MiB"
    tok = AutoTokenizer.from_pretrained(CHECKPOINT_DIR)
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR)
    assert isinstance(model, LlamaForCausalLM)
    assert isinstance(tok, PreTrainedTokenizerFast)
    ids = tok("VAR ABCDE = 12345").input_ids
    assert ids[0] == tok.bos_token_id and tok.eos_token_id is not None
    assert tok.decode(ids, skip_special_tokens=True) == "VAR ABCDE = 12345"
    assert (CHECKPOINT_DIR / "README.md").exists()


def _niah_sample(tok, length: int, seed: int):
    """A RULER niah_single_1 sample: from tasks/ruler when it exists, else the reference generator."""
    try:
        import tasks as T
        from tasks.base import PromptEncoder

        s = T.get_task("ruler/niah_single_1").samples(PromptEncoder(tok), length, 1, seed)[0]
        return s.context, s.question + s.answer_prefix, list(s.answers)
    except Exception:
        from harness.reference.evaluate import own_samples

        ctx, q, answers, _ = own_samples("niah_single_1", tok, length, 1, seed)[0]
        return ctx, q, answers


@needs_ckpt
def test_checkpoint_answers_niah_single_1_at_1k():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.reference.evaluate import greedy

    tok = AutoTokenizer.from_pretrained(CHECKPOINT_DIR)
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32).eval()
    ctx, q, answers = _niah_sample(tok, 1024, seed=3)
    pred, n_in = greedy(model, tok, ctx, q, 16)
    assert 700 < n_in <= 1024
    assert all(a in pred for a in answers), (pred, answers)


def test_model_loader_resolves_reference(monkeypatch):
    from harness.models import REFERENCE_DIR

    assert REFERENCE_DIR == CHECKPOINT_DIR


def test_tokenizer_spells_digits_and_capitals():
    from harness.reference.data import corpus_for_tokenizer
    from harness.reference.tokenizer import build_tokenizer

    tok = build_tokenizer(corpus_for_tokenizer(n=50)[:300], vocab_size=400)
    toks = tok.convert_ids_to_tokens(tok("VAR QWERT = 4185149").input_ids)
    assert toks[0] == "<s>"
    assert [t for t in toks if t.strip("Ġ").isdigit()] == list("4185149")
    assert "Q" in toks and "W" in toks and "T" in toks


def test_training_generators_follow_ruler_templates():
    from harness.reference.data import niah, vt

    ex = niah(random.Random(1_000_001), 300, "noise")
    assert ex.context.startswith("A special magic number is hidden within the following text.")
    q, t = ex.turns[0]
    assert q.startswith("\nWhat is the special magic number for ")
    assert q.endswith("mentioned in the provided text is") and t.strip().rstrip(".").isdigit()
    assert f"is: {t.strip().rstrip('.')}." in ex.context
    ex = vt(random.Random(1_000_002), 300)
    q, t = ex.turns[0]
    assert "5 variables are assigned the value" in q and len(t.split()) == 5
    assert all(f"VAR {v} " in ex.context for v in t.split())


def test_a_few_training_steps_lower_the_loss(tmp_path):
    from harness.reference.train import encode_example, forward_loss
    from harness.reference.data import corpus_for_tokenizer, niah
    from harness.reference.model import TINY_ARCH, reference_config
    from harness.reference.tokenizer import build_tokenizer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tok = build_tokenizer(corpus_for_tokenizer(n=50)[:300], vocab_size=400)
    model = AutoModelForCausalLM.from_config(reference_config(tok, TINY_ARCH), dtype=torch.float32)
    rng = random.Random(1_000_000)
    rows = [encode_example(tok, niah(rng, 128, "noise"), 0.1)[:2] for _ in range(4)]
    T = max(len(r[0]) for r in rows)
    x = torch.full((len(rows), T), tok.pad_token_id)
    wt = torch.zeros((len(rows), T))
    for i, (ids, w) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
        wt[i, : len(w)] = torch.tensor(w)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = forward_loss(model, x, wt)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.5, losses


def test_drill_rows_supervise_exactly_the_predictable_part_of_the_repeat():
    from harness.reference.train import drill_row

    class Tok:
        bos_token_id = 1

        def __len__(self):
            return 500

    for seed in range(20):
        ids, w, [(s, e, task)] = drill_row(Tok(), random.Random(seed), 48)
        assert len(ids) == len(w) == 48 and ids[0] == 1 and task == "drill"
        k = e - s + 1  # the repeated segment starts one token before the supervised span
        assert [i for i, x in enumerate(w) if x] == list(range(s, e))
        # The supervised tokens copy an earlier segment that starts with the same token.
        src = next(j for j in range(1, s - k + 1) if ids[j:j + k] == ids[s - 1:e])
        assert src + k <= s - 1


def test_skipped_positions_keep_the_whole_row_visible():
    """A PoSE row's jump in position ids must not split it into two packed sequences: the last token still
    sees the tokens before the jump (transformers infers packing from jumps when no mask is given)."""
    from harness.reference.model import TINY_ARCH, reference_config
    from harness.reference.train import forward_loss, skip_positions
    from transformers import AutoModelForCausalLM

    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

        def __len__(self):
            return 64

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(reference_config(Tok(), TINY_ARCH), dtype=torch.float32).eval()
    pos = torch.tensor([skip_positions(random.Random(3), 12, 5000)])
    assert pos[0, -1] > 100 and (pos.diff() != 1).sum() == 1
    x = torch.randint(3, 64, (1, 13))
    wt = torch.zeros(1, 13)
    wt[0, -1] = 1.0
    pos = torch.cat([pos, pos[:, -1:] + 1], 1)
    cut = int((pos.diff() != 1).nonzero()[0, 1]) + 1  # first position after the jump
    y = x.clone()
    y[0, 1] = (x[0, 1] + 1 - 3) % 61 + 3  # change a token before the jump
    with torch.no_grad():
        a = forward_loss(model, x, wt, pos)[1]
        b = forward_loss(model, y, wt, pos)[1]
    assert cut > 2 and not torch.isclose(a, b)


def test_train_cli_runs_and_saves(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.reference.train import main

    out = tmp_path / "ck"
    main(["--out", str(out), "--work-dir", str(tmp_path / "work"), "--steps", "2", "--tiny", "--batch-tokens",
          "512", "--max-len", "256", "--eval-every", "2", "--log-every", "1", "--vocab-size", "400",
          "--threads", "1", "--drill-steps", "1", "--drill-rows", "4",
          "--focus-steps", "1", "--recipe", "v1"])  # one drill step, one task step, one focus step
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    meta = json.loads((out / "training_meta.json").read_text())
    assert meta["step"] == meta["steps"] == 3
    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
