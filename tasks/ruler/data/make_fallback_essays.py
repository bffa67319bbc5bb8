"""Writes fallback_essays.txt: deterministic essay-like English prose from a small grammar.

It stands in for RULER's Paul Graham essays when no ``data_dir`` provides them (the essays are not ours
to ship). Every sentence is generated here; nothing is copied. Run from the repo root:

    python tasks/ruler/data/make_fallback_essays.py
"""
from __future__ import annotations

import random
import re
from pathlib import Path

SEED = 20240601
ARTICLE = re.compile(r"\b([Aa])( [aeiou])")
TARGET_CHARS = 450_000

TOPICS = ["cities", "startups", "writing", "schools", "cooking", "music", "gardens", "maps", "bridges", "libraries",
          "rivers", "trains", "letters", "workshops", "markets", "theaters", "museums", "farms", "harbors", "bicycles",
          "painting", "chess", "carpentry", "astronomy", "weather", "mathematics", "printing", "photography",
          "languages", "forests", "islands", "clocks", "kitchens", "lighthouses", "newspapers", "orchards"]
PEOPLE = ["a young engineer", "an old carpenter", "most beginners", "the best teachers", "a careful reader",
          "a curious child", "many founders", "the people who run them", "a good editor", "a stubborn inventor",
          "my neighbor", "a friend of mine", "the average visitor", "experienced travelers", "most experts",
          "a patient gardener", "a retired sailor", "the first settlers", "a new student", "a skeptical critic"]
VERBS_PAST = ["noticed", "discovered", "suspected", "learned", "forgot", "argued", "assumed", "explained", "realized",
              "decided", "remembered", "wrote down", "pointed out", "guessed"]
ADJS = ["quiet", "difficult", "surprising", "ordinary", "useful", "strange", "gradual", "fragile", "honest",
        "expensive", "simple", "crowded", "patient", "careless", "ambitious", "modest", "durable", "unfinished",
        "practical", "elegant", "awkward", "familiar", "remote", "generous", "restless", "obvious", "subtle"]
NOUNS = ["idea", "habit", "question", "mistake", "plan", "problem", "tool", "rule", "story", "method", "detail",
         "pattern", "choice", "experiment", "draft", "argument", "season", "routine", "lesson", "shortcut", "map",
         "machine", "recipe", "journey", "conversation", "promise", "decision", "instinct", "compromise"]
ADVS = ["usually", "often", "rarely", "eventually", "almost always", "sometimes", "surprisingly often", "seldom",
        "quietly", "gradually", "in practice", "at first", "in the end", "on most days"]
CONNECT = ["But", "And yet", "Still", "Of course", "In fact", "So", "Even so", "Partly for that reason",
           "Oddly enough", "As a result", "For a while", "Meanwhile", "Later", "Curiously"]
PLACES = ["in a small town", "on the coast", "in the old quarter", "near the station", "in the hills",
          "at the edge of the city", "in a rented room", "across the river", "in the back of a shop",
          "on the top floor", "in a crowded hall", "under a bridge", "by the harbor"]
TIMES = ["in the spring", "every winter", "for ten years", "one summer", "after the war", "in the morning",
         "late at night", "for a few weeks", "before breakfast", "during the long holidays", "each autumn"]

SENTENCES = [
    "The {adj} thing about {topic} is that {people} {adv} {verb} the wrong {noun}.",
    "{Conn}, {people} {verb} that a {adj} {noun} matters more than a {adj2} one.",
    "If you want to understand {topic}, start with the {noun} that nobody wants to talk about.",
    "I {verb} this {time}, {place}, while thinking about {topic}.",
    "A {adj} {noun} is {adv} worth more than a {adj2} {noun2}.",
    "{Conn}, the {noun} turned out to be {adj}, and {people} had to begin again.",
    "What makes {topic} {adj} is not the {noun} but the {noun2} behind it.",
    "{people_cap} {adv} {verb} that {topic} reward a {adj} {noun}.",
    "There is a {adj} {noun} hidden in most {topic}, and it takes a while to see it.",
    "You can tell a lot about {topic} from the {noun} they keep {place}.",
    "{Conn}, nobody {verb} how {adj} the {noun} would become.",
    "The first {noun} is {adv} the hardest, because everything about it is still {adj}.",
    "Ask {people} about {topic} and you will hear a {adj} {noun} about the {noun2}.",
    "Most of the work in {topic} is {adj}, and most of the progress is {adj2}.",
    "{Conn}, a {adj} {noun} {time} can change the whole {noun2}.",
    "It is easy to mistake a {adj} {noun} for a {adj2} {noun2}.",
    "When {people} {verb} the {noun}, the rest of {topic} began to make sense.",
    "The {noun} was {adj}, the {noun2} was {adj2}, and neither of them was finished.",
    "Nobody plans {topic} that way; it {adv} happens one {adj} {noun} at a time.",
    "Why do {topic} keep returning to the same {adj} {noun}?",
    "I think the answer is that a {adj} {noun} is easier to repeat than to question.",
    "{Conn}, {topic} grew {adj} {place}, far from the people who wrote about them.",
    "Looking back, the {noun} was never the problem; the {noun2} was.",
    "A good {noun} in {topic} feels {adj} at first and {adj2} later.",
    "We spent {time} arguing about one {adj} {noun}.",
    "Anyone who ignores the {noun} {adv} pays for it {time}.",
]
TITLES = ["On {topic}", "Why {topic} Change Slowly", "The {adj_cap} {noun_cap}", "Notes on {topic} and {topic2}",
          "What {topic} Teach", "The Case for {adj_cap} {topic}", "How to Think About {topic}"]


def sentence(rng: random.Random, topic: str) -> str:
    s = rng.choice(SENTENCES)
    people = rng.choice(PEOPLE)
    fill = {
        "adj": rng.choice(ADJS), "adj2": rng.choice(ADJS), "noun": rng.choice(NOUNS), "noun2": rng.choice(NOUNS),
        "adv": rng.choice(ADVS), "verb": rng.choice(VERBS_PAST), "Conn": rng.choice(CONNECT),
        "people": people, "people_cap": people[0].upper() + people[1:], "topic": topic,
        "place": rng.choice(PLACES), "time": rng.choice(TIMES),
    }
    text = ARTICLE.sub(lambda m: m.group(1) + "n" + m.group(2), s.format(**fill))
    return text[0].upper() + text[1:]


def essay(rng: random.Random) -> str:
    topic, topic2 = rng.sample(TOPICS, 2)
    title = rng.choice(TITLES).format(topic=topic.capitalize(), topic2=topic2, adj_cap=rng.choice(ADJS).capitalize(),
                                      noun_cap=rng.choice(NOUNS).capitalize())
    paragraphs = []
    for _ in range(rng.randint(8, 16)):
        t = topic if rng.random() < 0.7 else topic2
        paragraphs.append(" ".join(sentence(rng, t) for _ in range(rng.randint(3, 8))))
    month = rng.choice(["January", "March", "May", "July", "September", "November"])
    return f"{title}\n\n{month} {rng.randint(1995, 2023)}\n\n" + "\n\n".join(paragraphs) + "\n\n"


def main() -> None:
    rng = random.Random(SEED)
    parts, size = [], 0
    while size < TARGET_CHARS:
        parts.append(essay(rng))
        size += len(parts[-1])
    out = Path(__file__).with_name("fallback_essays.txt")
    out.write_text("".join(parts), encoding="utf-8")
    print(f"wrote {out} ({size} chars, {len(parts)} essays)")


if __name__ == "__main__":
    main()
