"""Chat prompts laid out as official RULER and kvpress lay them out.

RULER (scripts/data/prepare.py): ``model_template.format(task_template=...) + answer_prefix``: the chat template
wraps the task input as the user turn, and the answer prefix follows the assistant header, as the start of the
reply. kvpress (kvpress/pipeline.py ``preprocess``) splits that text where the context ends: the context part is
the template up to the end of the context, the question part is the question, the rest of the template (end of
turn, assistant header) and the answer prefix. LongBench (LongBench/pred.py) has no answer prefix: the whole
official prompt is the user turn.

The tokenizer is the byte tokenizer with a Llama-3 chat template; its header tokens are real special tokens, so the
expected strings below are RULER's own ``meta-llama3`` template (scripts/data/template.py), written out by hand.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from harness.tokenizer import byte_tokenizer
from tasks import get_task
from tasks.base import PromptEncoder, Sample
from tasks.longbench import make_task
from tasks.longbench.config import PROMPTS
from tasks.ruler.templates import BASE

FIX = Path(__file__).parent / "fixtures" / "longbench"

# Llama-3-Instruct's chat template (contents trimmed, BOS first, assistant header as the generation prompt).
LLAMA3_JINJA = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# RULER scripts/data/template.py, Templates['meta-llama3']
RULER_LLAMA3 = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{task_template}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
ASSISTANT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def tok():
    t = copy.deepcopy(byte_tokenizer())
    t.add_special_tokens({"bos_token": "<|begin_of_text|>",
                          "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    t.chat_template = LLAMA3_JINJA
    return t


@pytest.fixture(scope="module")
def chat(tok):
    return PromptEncoder(tok, chat=True)


def seen(tok, ctx_ids, q_ids) -> str:
    return tok.decode(ctx_ids + q_ids, skip_special_tokens=False)


def ruler_prepare(task_input: str, answer_prefix: str) -> tuple[str, str]:
    """RULER for a chat model: prepare.py's template (model template around the task, then the answer prefix),
    filled; niah.py's split into ``input`` and ``answer_prefix`` (rfind of the prefix's first 10 characters)."""
    text = RULER_LLAMA3.format(task_template=task_input) + answer_prefix
    at = text.rfind(BASE["niah"]["answer_prefix"][:10])
    return text[:at], text[at:]


def test_ruler_niah_chat_prompt_is_ruler_prepare_py(tok, chat):
    s = get_task("ruler/niah_single_1").samples(chat, 2048, 1, 0)[0]
    assert s.answer_prefix.startswith(" The special magic number for ") and s.answer_prefix.endswith(" is")
    ruler_input, ruler_prefix = ruler_prepare(s.context + s.question, s.answer_prefix)
    assert ruler_prefix == s.answer_prefix and ruler_input.endswith(ASSISTANT)
    expected = ruler_input + ruler_prefix  # call_api.py: input + answer_prefix
    ctx_ids, q_ids = chat.encode_sample(s)
    assert seen(tok, ctx_ids, q_ids) == expected == chat.text_sample(s)
    # the answer prefix starts the assistant's reply, after the header; never inside the user turn
    assert expected.endswith(ASSISTANT + s.answer_prefix)
    # kvpress's split: the context part is BOS + user header + context; the rest is question + suffix + prefix
    assert tok.decode(ctx_ids, skip_special_tokens=False) == RULER_LLAMA3.split("{task_template}")[0] + s.context
    assert tok.decode(q_ids, skip_special_tokens=False) == s.question + ASSISTANT + s.answer_prefix
    assert ctx_ids[0] == tok.bos_token_id and ctx_ids.count(tok.bos_token_id) == 1  # one BOS, from the template
    assert chat.count_sample(s) == len(ctx_ids) + len(q_ids) <= 2048


def test_ruler_evidence_spans_land_on_the_needle_tokens(tok, chat):
    for name in ("niah_single_1", "niah_multikey_1"):
        s = get_task(f"ruler/{name}").samples(chat, 2048, 1, 0)[0]
        ctx_ids, _ = chat.encode_sample(s)
        idx = chat.context_token_indices(s.context, s.meta["evidence"])
        want = "".join(s.context[b:e] for b, e in s.meta["evidence"])
        assert idx and tok.decode([ctx_ids[i] for i in idx]) == want
        assert all(i < len(ctx_ids) for i in idx)


def test_evidence_spans_survive_a_template_that_trims_the_context(tok, chat):
    context, spans = "  abc KEY=42 def", [[10, 12]]  # "42"; the template trims the two leading spaces
    ctx_ids, _ = chat.encode(context, "Q?", " A:")
    idx = chat.context_token_indices(context, spans)
    assert tok.decode([ctx_ids[i] for i in idx]) == "42"


def test_without_chat_template_the_layout_is_unchanged():
    plain = PromptEncoder(byte_tokenizer())
    s = get_task("ruler/niah_single_1").samples(plain, 1024, 1, 0)[0]
    ctx_ids, q_ids = plain.encode_sample(s)
    assert ctx_ids[0] == byte_tokenizer().bos_token_id
    assert byte_tokenizer().decode(ctx_ids + q_ids, skip_special_tokens=True) == s.context + s.question + s.answer_prefix
    assert plain.text_sample(s) == s.context + s.question + s.answer_prefix


def test_system_prompt_and_a_template_that_splits_the_user_turn(tok):
    with_system = PromptEncoder(tok, chat=True, system_prompt="Be brief.")
    assert with_system.text("C", "Q", " A") == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                                                "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nCQ"
                                                + ASSISTANT + " A")
    twice = copy.deepcopy(tok)
    twice.chat_template = "{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}"
    from harness.errors import KvbenchError

    with pytest.raises(KvbenchError, match="chat template"):
        PromptEncoder(twice, chat=True).encode("C", "Q")


@pytest.mark.parametrize("dataset", ["qasper", "passage_count"])
def test_longbench_chat_prompt_is_the_official_prompt_as_the_user_turn(tok, chat, dataset):
    task = make_task(f"longbench/{dataset}", data_dir=str(FIX))
    record = json.loads((FIX / f"{dataset}.jsonl").read_text("utf-8").splitlines()[0])
    s = task.build_sample(chat, record, 0, 1 << 16)
    assert not s.meta["truncated"] and s.answer_prefix == ""  # pred.py has no answer prefix
    official = PROMPTS[dataset].format(**record)  # pred.py: prompt_format.format(**json_obj)
    expected = RULER_LLAMA3.format(task_template=official.strip())  # the template trims the user message
    ctx_ids, q_ids = chat.encode_sample(s)
    assert seen(tok, ctx_ids, q_ids) == expected
    assert tok.decode(ctx_ids, skip_special_tokens=False).endswith(record["context"])  # split after the documents
    assert tok.decode(q_ids, skip_special_tokens=False).endswith(ASSISTANT)


def test_longbench_few_shot_datasets_run_without_the_chat_template():
    # pred.py: "chat models are better off without build prompts on these tasks"; the runner builds their
    # encoder with chat=False, so the text is the raw official prompt.
    for dataset in ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"):
        assert type(make_task(f"longbench/{dataset}", data_dir=str(FIX))).skip_chat_template
    assert not type(make_task("longbench/qasper", data_dir=str(FIX))).skip_chat_template


@pytest.mark.parametrize("query_aware", [False, True])
def test_query_modes_prefill_what_they_should(monkeypatch, query_aware):
    """Query-agnostic: the context part is prefilled (and compressed) first, then question + assistant header +
    answer prefix are fed; query-aware: the whole chat prompt is prefilled."""
    import harness.pipeline as pipeline
    from harness.attention import install
    from harness.models import build_tiny
    from test_selection import method

    model, tiny_tok = build_tiny("llama")
    tiny_tok = copy.deepcopy(tiny_tok)
    tiny_tok.chat_template = LLAMA3_JINJA  # header tokens as bytes: every id exists in the tiny model's vocab
    enc = PromptEncoder(tiny_tok, chat=True)
    s = get_task("ruler/niah_single_1").samples(enc, 1024, 1, 0)[0]
    ctx_ids, q_ids = enc.encode_sample(s)
    seen_ids = {}
    real_prefill, real_decode = pipeline.prefill, pipeline.decode

    def prefill(model, hooks, ids, *a, **kw):
        seen_ids["prefill"] = list(ids)
        return real_prefill(model, hooks, ids, *a, **kw)

    def decode(model, cache, tail, *a, **kw):
        seen_ids["tail"] = list(tail)
        return real_decode(model, cache, tail, *a, **kw)

    monkeypatch.setattr(pipeline, "prefill", prefill)
    monkeypatch.setattr(pipeline, "decode", decode)
    with install(model) as hooks:
        pipeline.run_sample(model, tiny_tok, hooks, method("snapkv"), ctx_ids, q_ids, [0.5], query_aware, 2, [],
                            seed=0)
    text = tiny_tok.decode(seen_ids["prefill"] + seen_ids["tail"], skip_special_tokens=False)
    assert text == enc.text_sample(s) and text.endswith(ASSISTANT + s.answer_prefix)
    prefilled = tiny_tok.decode(seen_ids["prefill"], skip_special_tokens=False)
    if query_aware:
        assert seen_ids["tail"] == [] and prefilled.endswith(s.answer_prefix)
    else:
        assert prefilled.endswith(s.context) and s.question not in prefilled
        assert tiny_tok.decode(seen_ids["tail"]) == s.question + ASSISTANT + s.answer_prefix


def test_sample_helpers_agree():
    enc = PromptEncoder(byte_tokenizer())
    s = Sample("x", "ctx ", "q?", ["a"], answer_prefix=" A:")
    assert enc.encode_sample(s) == enc.encode("ctx ", "q?", " A:")
    assert enc.count_sample(s) == enc.count("ctx ", "q?" + " A:") == 1 + len("ctx q? A:")
