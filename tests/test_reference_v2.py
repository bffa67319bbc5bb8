"""The reference model's v2 training data (harness/reference/data_v2.py) and the recipe's plumbing in train.py."""
from __future__ import annotations

import random

import pytest
import torch

from harness.reference import CHECKPOINT_DIR
from harness.reference.data_v2 import (MIN_LENGTH, OFFLINE_TASKS, TRAIN_SEED_MIN, RulerFormats, prose_example,
                                       ruler_target)

needs_tok = pytest.mark.skipif(not (CHECKPOINT_DIR / "tokenizer.json").exists(), reason="no shipped tokenizer")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(CHECKPOINT_DIR)


@pytest.fixture(scope="module")
def formats(tok):
    return RulerFormats(tok)


@needs_tok
@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_each_offline_format_is_the_tasks_own_prompt_and_its_target_scores_full(name, tok, formats):
    """A training example is tasks/ruler's sample for a training seed, prompt for prompt, and its target is an
    answer the task's official metric (string_match_all / _part) scores 1; the seed is drawn >= 1_000_000."""
    from tasks.base import PromptEncoder
    from tasks.ruler import make_task

    length = max(1024, MIN_LENGTH[name])
    rng = random.Random(7)
    ex = formats.example(rng, length, name)
    seed = random.Random(7).randrange(TRAIN_SEED_MIN, 2**62)  # the first draw (its prompt fits)
    assert seed >= TRAIN_SEED_MIN
    sample = make_task(name).sample(PromptEncoder(tok), length, seed, 0)
    (question, target), = ex.turns
    assert ex.context == sample.context and question == sample.question + sample.answer_prefix
    assert ex.task == name
    assert make_task(name).score(target, sample) == 1.0
    # RULER's budget: prompt + generation fits the length the example was built for
    ids = tok(ex.context).input_ids + tok(question, add_special_tokens=False).input_ids
    assert len(ids) + sample.max_new_tokens <= length
    assert len(tok(target, add_special_tokens=False).input_ids) <= sample.max_new_tokens


@needs_tok
def test_targets_are_written_as_the_prompts_show_answers(tok, formats):
    """vt and cwe: the solved example's answer format; niah: RULER's value list; several values of one key in
    the order the text gives them."""
    rng = random.Random(11)
    vt = formats.example(rng, 1024, "vt")
    names = vt.turns[0][1].split()
    assert vt.turns[0][1] == " " + " ".join(names) and all(f"VAR {v} =" in vt.context for v in names)
    cwe = formats.example(rng, 1536, "cwe")
    words = cwe.turns[0][1].split()
    assert words[0::2] == [f"{i}." for i in range(1, 11)]
    mv = formats.example(rng, 1024, "niah_multivalue")
    values = mv.turns[0][1].strip().rstrip(".").replace(", and ", ", ").split(", ")
    assert len(values) == 4 and [mv.context.find(v) for v in values] == sorted(mv.context.find(v) for v in values)
    assert mv.turns[0][1] == f" {values[0]}, {values[1]}, {values[2]}, and {values[3]}."


@needs_tok
def test_a_drawn_example_fits_its_length_and_no_long_task_is_drawn_for_a_short_row(tok, formats):
    rng = random.Random(3)
    drawn = set()
    for _ in range(40):
        ex = formats.example(rng, 512)
        drawn.add(ex.task)
        assert len(tok(ex.context + ex.turns[0][0]).input_ids) <= 512
    assert drawn and all(MIN_LENGTH[t] <= 512 for t in drawn)


def test_prose_rows_repeat_their_facts_later_and_weigh_the_repeats_fully():
    """Every weight-1 piece mentions a fact stated earlier in the row at the prose weight (its key, its value or
    the whole fact); the rest is prose at that weight."""
    seen_repeats = 0
    for seed in range(TRAIN_SEED_MIN, TRAIN_SEED_MIN + 30):
        ex = prose_example(random.Random(seed), 1024, weight=0.4)
        assert ex.context == "" and ex.turns == [] and ex.task == "prose"
        assert {w for _, w in ex.segments} <= {0.4, 1.0}
        earlier = ""
        for text, w in ex.segments:
            if w == 1.0:
                seen_repeats += 1
                assert text.strip().rstrip(".") in earlier, (text, earlier[-300:])  # a key, a value or a fact
                assert not earlier or earlier[-1] in " \n"  # uncued: it starts where a sentence ended
            earlier += text
    assert seen_repeats >= 10


def test_prose_segments_encode_with_their_weights():
    from harness.reference.train import encode_example
    from harness.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    ex = prose_example(random.Random(TRAIN_SEED_MIN + 5), 800, weight=0.25, recur_share=1.0, mention_rate=0.5)
    ids, w, spans = encode_example(tok, ex, lm_weight=0.0)
    assert ids[0] == tok.bos_token_id and w[0] == 0.0 and ids[-1] == tok.eos_token_id and len(ids) == len(w)
    pos = 1
    for text, weight in ex.segments:
        n = len(tok(text, add_special_tokens=False).input_ids)
        assert w[pos:pos + n] == [weight] * n
        pos += n
    assert pos == len(ids) - 1
    assert spans and all(set(w[s:e]) == {1.0} for s, e, _ in spans) and {k for *_, k in spans} == {"recur"}


def test_forward_loss_weighs_each_lm_token_by_its_own_weight():
    """One LM weight everywhere gives v1's loss (answer mean + weight x LM mean); mixed weights their mean."""
    from harness.reference.model import TINY_ARCH, reference_config
    from harness.reference.train import forward_loss
    from harness.tokenizer import byte_tokenizer
    from transformers import AutoModelForCausalLM
    import torch.nn.functional as F

    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(reference_config(tok, TINY_ARCH), dtype=torch.float32).eval()
    x = torch.randint(3, 200, (2, 12))
    wt = torch.zeros(2, 12)
    wt[:, 1:6] = 0.3
    wt[1, 3:6] = 0.7
    wt[:, 8:11] = 1.0
    with torch.no_grad():
        loss, ans, lm, _ = forward_loss(model, x, wt)
        logits = model(input_ids=x[:, :-1]).logits
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="none").view(2, 11)
    w = wt[:, 1:]
    lm_mask = (w > 0) & (w < 1)
    expected_lm = (ce * w)[lm_mask].sum() / lm_mask.sum()
    assert torch.allclose(ans, ce[w >= 1].mean(), atol=1e-5)
    assert torch.allclose(lm, ce[lm_mask].mean(), atol=1e-5)
    assert torch.allclose(loss, ans + expected_lm, atol=1e-5)


@pytest.mark.parametrize("args, named", [(["--recipe", "v3"], "--recipe"), (["--arch", "big"], "--arch"),
                                         (["--prose-share", "1.5"], "--prose-share"),
                                         (["--prose-weight", "-0.1"], "--prose-weight")])
def test_bad_recipe_flags_are_refused_in_one_line(args, named, capsys, tmp_path):
    from harness.reference.train import main

    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w"), *args])
    assert info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and ": error: " in lines[0] and named in lines[0], lines
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_v2_recipe_trains_a_tiny_model_end_to_end(tmp_path):
    import json

    from harness.reference.train import main

    out = tmp_path / "ck"
    main(["--out", str(out), "--work-dir", str(tmp_path / "work"), "--recipe", "v2", "--tiny", "--steps", "2",
          "--batch-tokens", "800", "--max-len", "400", "--eval-every", "3", "--log-every", "1", "--vocab-size",
          "400", "--threads", "1", "--drill-steps", "1", "--drill-rows", "4", "--focus-steps", "1"])
    meta = json.loads((out / "training_meta.json").read_text())
    assert meta["step"] == 3 and meta["args"]["recipe"] == "v2"


@needs_tok
def test_v2_heldout_cells_are_ruler_prompts_on_evaluation_seeds(tok, formats):
    """The training run's held-out check scores each v2 cell (exact teacher-forced answers, in [0, 1]) on
    RULER's own prompts at evaluation seeds (< 1000); the same call twice gives the same prompts."""
    from transformers import AutoModelForCausalLM

    from harness.reference.model import TINY_ARCH, reference_config
    from harness.reference.train import HELDOUT_SEED, heldout_eval, heldout_v2

    assert HELDOUT_SEED < 1000
    cells = heldout_v2(formats, lengths=(2048,))
    first = [fn(random.Random(1)) for _, fn in cells[2048]]
    assert [ex.context for ex in first] == [fn(random.Random(1)).context for _, fn in cells[2048]]
    assert {ex.task for ex in first} == {"niah_single_1", "niah_multikey_3", "niah_multivalue", "vt", "cwe", "fwe"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(reference_config(tok, TINY_ARCH), dtype=torch.float32).eval()
    res = heldout_eval(model, tok, "cpu", n=1, cells=cells)
    assert set(res) == {f"{k}@2048" for k in ("niah1", "mk3", "mv", "vt", "cwe", "fwe")}
    assert all(0.0 <= v <= 1.0 for v in res.values())
