"""Variable tracking (RULER ``vt``), after NVIDIA/RULER scripts/data/synthetic/variable_tracking.py.

A chain ``VAR AAAAA = 12345``, ``VAR BBBBB = VAR AAAAA``, ... (num_hops + 1 statements, 5-letter names) is
hidden among noise sentences, one statement per line, each statement at a random line (order kept). The
prompt starts with one solved in-context example (3-letter names, its own noise, at most 500 tokens, its
names and value re-drawn per sample as RULER's ``randomize_icl`` does), then a blank line, then the task.

``meta["evidence"]``: spans of the queried chain's statements in ``context`` (the example's excluded);
``meta["depth"]``: line depth in percent of the chain's first statement, ``meta["depths"]``: all of them.
"""
from __future__ import annotations

import random
import string

from tasks.base import PromptEncoder, Sample
from tasks.ruler.common import (CALIBRATION, RulerTask, TextBuilder, depth_percent, fit_length, make_sample, rng_for,
                                ruler_search, ruler_upper)
from tasks.ruler.templates import CONFIGS, NOISE, vt_prompt, vt_statements

ICL_MAX_TOKENS = 500  # variable_tracking.py main(): the example is fitted to max_seq_length=500


def _names(rng: random.Random, count: int, k: int) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=k))
        if name not in out:
            out.append(name)
    return out


def _chains(rng: random.Random, num_chains: int, num_hops: int, k: int) -> tuple[list[list[str]], list[list[str]]]:
    names = _names(rng, num_chains * (num_hops + 1), k)
    all_vars, chains = [], []
    for c in range(num_chains):
        v = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        value = rng.randint(10000, 99998)  # np.random.randint(10000, 99999): upper bound exclusive
        chain = vt_statements(v, value)
        all_vars.append(v)
        chains.append(chain)
    return all_vars, chains


def _haystack(rng: random.Random, chains: list[list[str]], n: int) -> list:
    """Noise lines with each chain's statements at sorted random lines; statements as (chain, j, text).

    RULER samples distinct lines (so it needs at least as many noise lines as statements); with fewer
    noise lines (short budgets) the lines are drawn with replacement and statements may be adjacent."""
    lines: list = [NOISE] * n
    for c, chain in enumerate(chains):
        if len(lines) >= len(chain):
            positions = sorted(rng.sample(range(len(lines)), len(chain)))
        else:
            positions = sorted(rng.choices(range(len(lines) + 1), k=len(chain)))
        for j, p in enumerate(positions):
            lines.insert(p + j, (c, j, chain[j]))
    return lines


class VariableTrackingTask(RulerTask):
    ruler_name = "vt"
    category = "multi-hop tracing"
    metric = "string_match_all"
    haystack = "noise"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        cfg = CONFIGS["vt"]
        self.num_chains, self.num_hops = cfg["num_chains"], cfg["num_hops"]
        self.max_new_tokens = 30  # constants.py: variable_tracking tokens_to_generate
        self.n_min = 0
        self._icl_sizes: dict[tuple, int] = {}

    def ruler_incremental(self, context_length: int) -> int:
        """variable_tracking.py sys_vartrack_w_noise_random: 10 noise lines (5 below max_seq_length 4096)."""
        return 5 if context_length < 4096 else 10

    def ruler_upper(self, encoder: PromptEncoder, context_length: int, incremental: int) -> int:
        """RULER's probe is the task prompt without the solved example."""
        probe = self._build(encoder, context_length, (CALIBRATION, self.ruler_name), incremental, with_icl=False)
        return ruler_upper(self.count(encoder, probe), incremental, context_length, incremental)

    def _icl_parts(self, rng: random.Random, n_icl: int) -> tuple[str, str]:
        """The solved example, (prompt, answer): its noise layout is fixed (one example per dataset as in
        RULER), names and value are drawn from ``rng`` (RULER's randomize_icl)."""
        hops = min(10, self.num_hops)
        all_vars, chains = _chains(rng, 1, hops, 3)
        lines = _haystack(rng_for("vt-icl-layout", n_icl), chains, n_icl)
        body = "\n".join(x if isinstance(x, str) else x[2] for x in lines)
        value = chains[0][0].split("=")[-1].strip()
        head, tail, prefix = vt_prompt(value, hops + 1)
        return head + body + tail + prefix, " " + " ".join(all_vars[0]) + "\n"

    def _icl(self, rng: random.Random, n_icl: int) -> str:
        return "".join(self._icl_parts(rng, n_icl))

    def _icl_size(self, encoder: PromptEncoder) -> int:
        """Noise lines of the solved example. ruler: RULER's own search for it (main(): max_seq_length=500,
        no generation, incremental 5, the example's prompt counted without special tokens); kvbench, or where
        RULER's finds nothing (it would retry forever): the largest size whose whole example fits 500 tokens."""
        k = self._encoder_key(encoder, ICL_MAX_TOKENS)
        if k not in self._icl_sizes:
            rng_key = ("vt-icl-calibration",)
            size = None
            if self.official:
                def count(n: int) -> int:
                    text = self._icl_parts(rng_for(*rng_key), n)[0]
                    return len(encoder.tokenizer(text, add_special_tokens=False).input_ids)

                inc = 5
                size = ruler_search(count, ICL_MAX_TOKENS, 0, inc, ruler_upper(count(inc), inc, ICL_MAX_TOKENS, inc))
                size = inc if size is None else size
                while size is not None and count(size) > ICL_MAX_TOKENS:
                    size = self.ruler_down(size, inc)
            if size is None:
                n, t = fit_length(lambda n: encoder.count(self._icl(rng_for(*rng_key), n), ""),
                                  ICL_MAX_TOKENS, 0, 0)
                size = n if n is not None else 0
            self._icl_sizes[k] = size
        return self._icl_sizes[k]

    def build(self, encoder: PromptEncoder, context_length: int, key: tuple, n: int) -> Sample:
        return self._build(encoder, context_length, key, n, with_icl=True)

    def _build(self, encoder: PromptEncoder, context_length: int, key: tuple, n: int, with_icl: bool) -> Sample:
        rng = rng_for(*key)
        icl = self._icl(rng, self._icl_size(encoder))  # drawn either way: the chain's draws come after it
        all_vars, chains = _chains(rng, self.num_chains, self.num_hops, 5)
        value = chains[0][0].split("=")[-1].strip()
        lines = _haystack(rng_for(*key, "haystack", n), chains, n)
        # RULER then applies context.replace(". \n", ".\n"): a no-op here (no line ends with ". ").
        body = TextBuilder()
        depths = []
        for i, line in enumerate(lines):
            if i:
                body.add("\n")
            if isinstance(line, str):
                body.add(line)
            else:
                c, j, text = line
                if c == 0:
                    body.add(text, ("evidence", 0, len(text.rstrip())))
                    depths.append(depth_percent(i, len(lines)))
                else:
                    body.add(text)
        head, tail, prefix = vt_prompt(value, self.num_hops + 1)
        meta = {"haystack": self.haystack, "depth": depths[0], "depths": depths, "query": value}
        head = (icl + "\n" if with_icl else "") + head
        return make_sample(head, body, tail, prefix, all_vars[0], self.max_new_tokens, meta)
