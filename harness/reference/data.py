"""Synthetic training data for the reference model: RULER-style retrieval and tracking prompts.

Every generator returns an ``Example``: a context (prefilled with BOS, like the harness does), a question
(question text + answer prefix) and one or more supervised ``(prompt_continuation, target)`` turns. The
prompt text is RULER's, built by the harness's own builders (tasks/ruler/templates.py), so that the harness's
``tasks/ruler`` prompts are in-distribution; extra tasks (dense key-value lookups, multi-needle,
word haystacks, longer/shorter variable chains) make the retrieval skill robust rather than template-bound.

Randomness comes only from the ``random.Random`` passed in, so a seed fixes the data. Training uses seeds
>= 1_000_000; evaluation uses seeds < 1000.
"""
from __future__ import annotations

import functools
import inspect
import importlib
import random
import re
import string
import uuid
from dataclasses import dataclass, field

# RULER's prompt text is built once, in tasks/ruler; the draws are this module's own.
from tasks.ruler.templates import NOISE, join_items, needle_sentence, niah_prompt, vt_prompt, vt_statements

ADJECTIVES = """able absent acid active adorable afraid agreeable alert alive amused angry annoyed anxious
aquatic arrogant ashamed awful bad beautiful better bewildered big billowy bitter black blue blushing bored
brainy brave breakable bright broad broken bumpy busy calm careful cautious charming cheap cheerful chilly
clean clever cloudy clumsy cold colorful combative comfortable concerned confused cool cooperative
courageous crazy creepy crooked crowded cruel cuddly curious cute damaged damp dangerous dark dead deep
defeated defiant delicious delightful depressed determined different difficult dirty disgusted distinct
dizzy doubtful drab dry dull dusty eager early easy elated elegant embarrassed empty enchanting energetic
enthusiastic envious equable evil excited expensive exuberant faint fair faithful famous fancy fantastic
fast fat fierce filthy fine flaky flat fluffy foolish fragile frail frantic free fresh friendly frightened
funny fuzzy gentle giant gifted glamorous gleaming glorious good gorgeous graceful greasy great greedy
green grieving grotesque grumpy handsome happy hard harsh healthy heavy helpful helpless high hilarious
hissing hollow homeless honest horrible hot huge hungry hurt icy ill important impossible inexpensive
innocent inquisitive itchy jealous jittery jolly joyous juicy kind large late lazy light little lively
lonely long loose loud lovely lucky macho magnificent mammoth massive melodic messy mighty miniature
modern motionless muddy mushy mysterious narrow nasty naughty nervous new nice noisy nutty obedient
obnoxious odd old open orange ordinary outrageous outstanding panicky perfect plain pleasant poised poor
powerful precious prickly proud puny purple puzzled quaint quick quiet quizzical rainy rapid rare real
rich ripe robust round rude rural rustic sad safe salty scary selfish serious shaggy shaky shallow sharp
shiny short shy silly skinny sleepy slimy slow small smiling smooth soft solid sore sour sparkling
spicy splendid spotless square steady steep sticky stormy strange strong stupid successful super sweet
swift tall tame tasty tender tense terrible testy thankful thirsty thoughtful tight tiny tired tough
troubled ugliest uneven unusual upset uptight vast victorious vivacious wandering warm weak wealthy
weary wet whispering wicked wide wild windy wise witty wonderful worried wrong young yummy zany zealous""".split()

NOUNS = """account acoustics action activity actor advice afternoon agreement airport alarm amount animal
answer apparel apple army art attack attempt aunt baby badge bag ball balloon banana band base basket bath
battle bead bear beast bed bee beggar believe bell berry bike bird birthday bit blade blood board boat body
bomb bone book boot border bottle boundary box boy brain brake branch brass bread breakfast brick bridge
brother brush bubble bucket building bulb burn butter button cabbage cactus cake calculator calendar camera
camp canvas cap captain car card carpenter carriage cart cast cat cattle cause cave celery cellar cemetery
chain chair chalk chance change channel cheese cherry chicken children chin church circle city clam class
clock cloth cloud clover club coach coal coast coat cobweb coil collar color comb comfort committee company
comparison condition copper corn cough country cover cow crack cracker crate crayon cream creator creature
crib crime crook crow crowd crown cub cup current curtain curve cushion dad daughter day debt decision deer
degree desk destruction detail development dinner dinosaur direction dirt discovery disease dock doctor dog
doll donkey door drain drawer dress drink driving drop duck dust ear earth earthquake edge egg elbow engine
error event example expert eye face fact fairy family fan farm father faucet feast feather feeling field
finger fire fish flag flame flavor flight floor flower fog fold food foot force fork form fowl frame friend
frog fruit furniture game garden gate geese ghost giraffe girl glass glove glue goat gold goose government
governor grain grandfather grape grass ground group guide guitar gun hair hammer hand harbor harmony hat
head health heart heat hill history hobbies hole home honey hook horn horse hospital hour house humor ice
idea income industry ink insect instrument invention iron island jail jam jar jeans jelly jewel join joke
journey judge juice kettle key kick kitten kite knee knife knot lace ladybug lake lamp land language laugh
lawyer lead leaf leather leg letter lettuce level library lift light limit line linen lip liquid list lock
locket lunch machine magic maid mailbox man map marble market mask match meal measure meat memory metal
milk mind mine minute mist mitten money monkey month moon morning mother motion mountain mouth muscle
music nail name nation neck needle nerve nest net news night noise nose note number nut oatmeal ocean
office oil orange oven owl page pail pain paint pan paper parcel parent park partner party passenger pear
pen pencil person pest pet piano pickle picture pie pig pin pipe pizza place plane plant plastic plate
playground plot pocket poet point poison police pollution popcorn porter potato powder power price prince
princess prison property pump pumpkin purpose quarter queen quiet quilt rabbit rail rain rainstorm rake
rat rate ray reaction receipt recess record reward rhythm rice riddle rifle ring river road robin rock
rod roll roof room root rose rub rule sack sail salt sand scale scarecrow scarf school science scissors
screw sea seashore seat secretary seed servant shade shake shame sheep shelf ship shirt shoe shop show
side silk silver sink sister size skate skin sky sleep slope smile smoke snail snake sneeze snow soap sock
soda son song sound soup space spade spark spoon spot spring square squirrel stage stamp star statement
station steam steel stem step stick stitch stocking stomach stone stove straw stream street string
structure sugar suit summer sun support swim system table tail talk team teeth temper tent territory
thread throat thumb ticket tiger time tin toad toe tomato tongue tooth toothbrush toothpaste town toy
trade trail train tray tree trick trip trouble truck tub turkey twig umbrella uncle underwear vacation
vase vein verse vessel view village vinegar voice volcano wall war wash watch water wave wax way wealth
weather week weight wheel whip whistle wind window wine wing winter wire wish woman wood wool word work
worm wound wren wrench wrist writer yard yarn yoke zebra zephyr zinc zipper zoo""".split()

DOC_MODULES = (
    "collections functools itertools json os pathlib re string textwrap threading subprocess argparse logging "
    "email http.client urllib.request unittest typing dataclasses asyncio socket csv sqlite3 datetime decimal "
    "fractions random statistics heapq bisect shutil tempfile zipfile tarfile pickle copy enum abc contextlib "
    "io struct array queue sched"
).split()

_SUBJ = "the team|a founder|my friend|the committee|an investor|the startup|every programmer|the old professor|" \
    "a small company|the city|most people|the best students|a good writer|the market|our users|the engineers|" \
    "a painter|the government|nobody|the first version"
_VERB = "built|noticed|wanted|explained|ignored|changed|wrote|found|discovered|learned|tried|described|" \
    "made|sold|fixed|understood|started|questioned|copied|improved"
_OBJ = "the product|a new language|the problem|an essay|the idea|a better way|the old system|their own tools|" \
    "a simple rule|the hardest part|the whole project|a strange result|the question|a small program|" \
    "the schedule|the mistake|a famous painting|the budget|the long road|a quiet town"
_TAIL = "last year|in the end|without much effort|because it mattered|for the first time|after a while|" \
    "in a few weeks|before anyone else|more slowly than expected|when it was too late|almost by accident|" \
    "at the office|in {year}|about {n} times|with {n} people|during the summer"


@functools.lru_cache(maxsize=1)
def doc_sentences() -> tuple[str, ...]:
    """English prose sentences harvested from stdlib docstrings (the stand-in for RULER's essay haystack)."""
    texts = set()
    for name in DOC_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # pragma: no cover - a stripped stdlib
            continue
        if mod.__doc__:
            texts.add(mod.__doc__)
        for _, obj in sorted(inspect.getmembers(mod), key=lambda kv: kv[0]):
            if isinstance(obj, (int, str, float, bytes, tuple, list, dict)):
                continue
            doc = inspect.getdoc(obj)
            if doc:
                texts.add(doc)
    sents = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", "\n".join(sorted(texts))))
    keep = [s for s in sents if 30 < len(s) < 250 and s[0].isupper()
            and re.fullmatch(r"[A-Za-z0-9 ,;:'\-\.\(\)!?]+", s)]
    return tuple(sorted(set(keep)))


@functools.lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    words = set(ADJECTIVES) | set(NOUNS)
    for s in doc_sentences():
        words.update(w for w in re.findall(r"[a-z]{4,11}", s))
    return tuple(sorted(words))


def grammar_sentence(rng: random.Random) -> str:
    pick = lambda s: rng.choice(s.split("|"))  # noqa: E731
    s = f"{pick(_SUBJ)} {pick(_VERB)} {pick(_OBJ)} {pick(_TAIL)}."
    s = s.format(year=rng.randint(1900, 2030), n=rng.randint(2, 999))
    return s[0].upper() + s[1:]


def prose_sentence(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(doc_sentences())
    return grammar_sentence(rng)


@functools.lru_cache(maxsize=1)
def ruler_assets():
    """The harness's RULER word lists and offline essay sentences (tasks/ruler), when importable."""
    try:
        from tasks.ruler.common import load_essays, word_list

        return word_list("adjectives"), word_list("nouns"), tuple(load_essays(None).sentences)
    except Exception:  # the package is absent: the built-in lists and prose only
        return None


def essay_sentences(rng: random.Random, n: int) -> list[str]:
    """An essay haystack: contiguous sentences of the harness's essay corpus (often from its start, as RULER
    takes the first words), or a mix of stdlib-docstring and template prose."""
    assets = ruler_assets()
    if assets is not None and rng.random() < 0.7:
        sents = assets[2]
        start = 0 if rng.random() < 0.4 else rng.randrange(len(sents))
        return [sents[(start + i) % len(sents)] for i in range(n)]
    return [prose_sentence(rng) for _ in range(n)]


# --- needles -------------------------------------------------------------------------------------------

def rand_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def rand_word(rng: random.Random) -> str:
    r = rng.random()
    assets = ruler_assets()
    if assets is not None and r < 0.5:
        return f"{rng.choice(assets[0])}-{rng.choice(assets[1])}"
    r = rng.random()
    if r < 0.6:
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    pool = word_pool()
    if r < 0.9:
        return f"{rng.choice(pool)}-{rng.choice(pool)}"
    return rng.choice(pool)


def rand_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def rand_of(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return rand_number(rng, 7 if rng.random() < 0.85 else rng.randint(4, 9))
    if kind == "words":
        return rand_word(rng)
    if kind == "uuids":
        return rand_uuid(rng)
    raise ValueError(kind)


@dataclass
class Example:
    context: str
    # (text appended after the context, supervised target) pairs; the text is the question + answer prefix
    turns: list[tuple[str, str]] = field(default_factory=list)
    task: str = ""
    # a language-modelling row instead (v2's prose, harness/reference/data_v2.py): (text, loss weight) pieces
    # after BOS, encoded one after another; context and turns are then empty
    segments: list[tuple[str, float]] | None = None


def _haystack_units(kind: str, n: int, rng: random.Random, type_k: str, type_v: str) -> list[str]:
    if kind == "noise":
        return [NOISE] * n
    if kind == "needle":
        return [needle_sentence(type_v, rand_of(type_k, rng), rand_of(type_v, rng)) for _ in range(n)]
    if kind == "essay":
        return essay_sentences(rng, n)
    if kind == "words":  # a haystack of random words, a few per line
        return [" ".join(rng.choice(word_pool()) for _ in range(rng.randint(3, 9))) + "." for _ in range(n)]
    raise ValueError(kind)


def _insert_before(units: list[str], positions: list[int], items: list[str]) -> list[str]:
    """``units`` with ``items[i]`` inserted before ``units[positions[i]]`` (positions sorted, in units' indices)."""
    out, last = [], 0
    for pos, item in zip(positions, items):
        out.extend(units[last:pos])
        out.append(item)
        last = pos
    out.extend(units[last:])
    return out


# rough tokens per haystack unit (used only to size training haystacks)
UNIT_TOKENS = {"noise": 35, "needle": 27, "essay": 19, "words": 18}
NEEDLE_TOKENS = 27


def niah(rng: random.Random, n_tokens: int, haystack: str = "noise", type_k: str = "words", type_v: str = "numbers",
         num_k: int = 1, num_v: int = 1, num_q: int = 1) -> Example:
    """One RULER niah prompt, RULER's code path (template pluralisation, depth insertion) reproduced."""
    num_k = max(num_k, num_q)
    budget = n_tokens - 80 - NEEDLE_TOKENS * num_k * num_v
    n = max(1, budget // UNIT_TOKENS[haystack])
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(rand_of(type_k, rng))
        vals = []
        for _ in range(num_v):
            vals.append(rand_of(type_v, rng))
            needles.append(needle_sentence(type_v, keys[-1], vals[-1]))
        values.append(vals)
    rng.shuffle(needles)
    units = _haystack_units(haystack, n, rng, type_k, type_v)
    if haystack == "essay":
        depths = sorted(int(len(units) * d / 100) for d in rng.sample(range(0, 101), len(needles)))
        context = " ".join(_insert_before(units, depths, needles))
    else:
        if len(units) >= len(needles):
            idx = sorted(rng.sample(range(len(units)), len(needles)), reverse=True)
        else:
            idx = sorted(rng.choices(range(len(units) + 1), k=len(needles)), reverse=True)
        for i, nd in zip(idx, needles):
            units.insert(i, nd)
        context = "\n".join(units)
    qi = rng.sample(range(num_k), num_q)
    queries = [keys[i] for i in qi]
    answers = [a for i in qi for a in values[i]]
    head, question, prefix = niah_prompt(type_v, queries, singular=num_q * num_v == 1)
    # context | question: the harness splits where the question starts
    return Example(head + context, [(question + prefix, " " + join_items(answers) + ".")], "niah")


def _vt_chain(rng: random.Random, num_hops: int, used: set[str], k: int = 5) -> tuple[list[str], list[str]]:
    names = []
    while len(names) < num_hops + 1:
        v = "".join(rng.choices(string.ascii_uppercase, k=k))
        if v not in used:
            used.add(v)
            names.append(v)
    value = str(rng.randint(10000, 99999))
    return names, vt_statements(names, value)


def _vt_context(rng, chains, n_noise, haystack):
    if haystack == "noise":
        sents = [NOISE] * n_noise
        for chain in chains:
            if len(sents) >= len(chain):
                pos = sorted(rng.sample(range(len(sents)), len(chain)))
            else:
                pos = sorted(rng.choices(range(len(sents) + 1), k=len(chain)))
            for j, (p, line) in enumerate(zip(pos, chain)):
                sents.insert(p + j, line)
        return "\n".join(sents).replace(". \n", ".\n")
    # essay: chains interleaved in order, at random depths
    units = essay_sentences(rng, n_noise)
    flat = []
    heads = [list(c) for c in chains]
    while any(heads):
        c = rng.choice([h for h in heads if h])
        flat.append(c.pop(0).strip() + ".")
    depths = sorted(int(len(units) * d / 100) for d in rng.choices(range(0, 101), k=len(flat)))
    return " ".join(_insert_before(units, depths, flat))


def vt(rng: random.Random, n_tokens: int, num_chains: int = 1, num_hops: int = 4, haystack: str = "noise",
       icl: bool = False, icl_lines: tuple[int, int] = (8, 14)) -> Example:
    """RULER variable tracking (optionally with RULER's few-shot example in front)."""
    used: set[str] = set()
    prefix_text = ""
    if icl:  # RULER's solved example (3-letter names), as tasks/ruler/variable_tracking.py lays it out
        names, chain = _vt_chain(rng, num_hops, used, k=3 if rng.random() < 0.8 else 5)
        value = chain[0].split("=")[-1].strip()
        ctx = _vt_context(rng, [chain], rng.randint(*icl_lines), "noise")
        head, question, prefix = vt_prompt(value, num_hops + 1)
        prefix_text = head + ctx + question + prefix + " " + " ".join(names) + "\n\n"
    chains_names = [_vt_chain(rng, num_hops, used) for _ in range(num_chains)]
    budget = n_tokens - 90 - len(prefix_text) // 3 - 12 * num_chains * (num_hops + 1)
    n_noise = max(2, budget // (UNIT_TOKENS["noise"] if haystack == "noise" else UNIT_TOKENS["essay"]))
    ctx = _vt_context(rng, [c for _, c in chains_names], n_noise, haystack)
    names, chain = chains_names[0]
    value = chain[0].split("=")[-1].strip()
    head, question, prefix = vt_prompt(value, num_hops + 1)
    return Example(prefix_text + head + ctx, [(question + prefix, " ".join(names))], "vt")


def dense_kv(rng: random.Random, n_tokens: int) -> Example:
    """Many needles, many questions: lots of supervised retrievals per sequence (fast skill learning)."""
    type_k = rng.choice(["words", "words", "numbers", "uuids"])
    type_v = rng.choice(["numbers", "numbers", "words", "uuids"])
    n_q = rng.randint(2, max(2, min(8, n_tokens // 200)))
    haystack = rng.choice(["noise", "essay", "needle", "words"])
    n_needles = rng.randint(n_q, n_q + max(1, min(8, n_tokens // 150)))
    budget = n_tokens - 60 * n_q - NEEDLE_TOKENS * n_needles
    n = max(1, budget // UNIT_TOKENS[haystack])
    keys = []
    while len(keys) < n_needles:
        k = rand_of(type_k, rng)
        if k not in keys:
            keys.append(k)
    vals = [rand_of(type_v, rng) for _ in keys]
    units = _haystack_units(haystack, n, rng, type_k, type_v)
    for k, v in zip(keys, vals):
        units.insert(rng.randint(0, len(units)), needle_sentence(type_v, k, v))
    sep = " " if haystack == "essay" else "\n"
    head = niah_prompt(type_v, keys, singular=False)[0] + sep.join(units)
    turns = []
    for i in rng.sample(range(n_needles), n_q):
        _, question, prefix = niah_prompt(type_v, [keys[i]], singular=True)  # one key asked at a time
        turns.append((question + prefix, f" {vals[i]}."))
    return Example(head, turns, "dense_kv")


def copy_task(rng: random.Random, n_tokens: int) -> Example:
    """Induction drill: a random list (numbers, keys, variable names, uuids), then the list again from a
    random item on: every answer token is predictable only by finding the previous occurrence."""
    kind = rng.choice(["numbers", "words", "words", "words", "vars", "uuids", "mixed"])
    items = []
    budget = max(40, min(n_tokens, 1024) // 2)
    size = 0
    while size < budget:
        k = kind if kind != "mixed" else rng.choice(["numbers", "words", "vars"])
        if k == "vars":
            it = "VAR " + "".join(rng.choices(string.ascii_uppercase, k=5))
        else:
            it = rand_of(k, rng)
        items.append(it)
        size += {"numbers": 9, "words": 6, "vars": 9, "uuids": 30}[k]
    start = 0 if rng.random() < 0.3 else rng.randrange(max(1, len(items) - 4))
    end = min(len(items), start + rng.randint(4, 40))
    head = "Memorize the following list.\n" + "\n".join(items)
    q = "\nRepeat the list from item " + items[start] + " on:\n" + items[start]
    return Example(head, [(q, "\n" + "\n".join(items[start + 1:end]) + "\n")], "copy")


def sample_example(rng: random.Random, n_tokens: int, copy_share: float = 0.15) -> Example:
    """The training mix."""
    if rng.random() < copy_share:
        return copy_task(rng, n_tokens)
    r = rng.random()
    if r < 0.2:  # niah_single_1 style
        return niah(rng, n_tokens, "noise", "words", "numbers")
    if r < 0.26:  # niah_single_2/3 style
        return niah(rng, n_tokens, "essay", "words", rng.choice(["numbers", "uuids", "words"]))
    if r < 0.44:  # niah_multikey_1 style
        return niah(rng, n_tokens, "essay", "words", "numbers", num_k=rng.randint(2, 6))
    if r < 0.49:  # niah_multikey_2/3 style
        tk = rng.choice(["words", "uuids", "numbers"])
        return niah(rng, n_tokens, "needle", tk, rng.choice(["numbers", "uuids"]))
    if r < 0.53:  # multivalue / multiquery
        if rng.random() < 0.5:
            return niah(rng, n_tokens, rng.choice(["essay", "noise"]), "words", "numbers", num_v=rng.randint(2, 4))
        return niah(rng, n_tokens, rng.choice(["essay", "noise"]), "words", "numbers", num_q=rng.randint(2, 4))
    if r < 0.57:  # other haystacks
        return niah(rng, n_tokens, rng.choice(["words", "noise"]), rng.choice(["words", "numbers"]),
                    rng.choice(["numbers", "words"]), num_k=rng.randint(1, 4))
    if r < 0.85:  # vt (RULER: 1 chain, 4 hops, noise)
        if rng.random() < 0.7:
            return vt(rng, n_tokens, 1, 4, "noise", icl=rng.random() < 0.6)
        return vt(rng, n_tokens, rng.randint(1, 3), rng.randint(1, 6), rng.choice(["noise", "essay"]),
                  icl=rng.random() < 0.3)
    return dense_kv(rng, n_tokens)


def focus_example(rng: random.Random, n_tokens: int, copy_share: float = 0.0) -> Example:
    """The mix of the last (focus) phase: RULER's own formats, mostly variable tracking with its solved
    example in front (as long as RULER's, up to ~500 tokens), whose 5-hop chains are the skill the main mix
    leaves weakest; multikey needles next, and some of the main mix so nothing else is forgotten."""
    r = rng.random()
    if r < 0.5:
        return vt(rng, n_tokens, 1, 4, "noise", icl=rng.random() < 0.9, icl_lines=(8, 24))
    if r < 0.7:
        return niah(rng, n_tokens, "essay", "words", "numbers", num_k=rng.randint(2, 6))
    if r < 0.8:
        return niah(rng, n_tokens, "noise", "words", "numbers")
    return sample_example(rng, n_tokens, copy_share)


def corpus_for_tokenizer(n: int = 3000, seed: int = 2_000_000) -> list[str]:
    """Texts to train the BPE on: the same generators, short."""
    rng = random.Random(seed)
    out = list(doc_sentences())
    for _ in range(n):
        ex = sample_example(rng, rng.choice([200, 400]))
        out.append(ex.context + "".join(q + t for q, t in ex.turns))
    return out
