"""A deterministic synthetic knowledge world: invented entities, passages and questions.

Everything is generated from ``random.Random(seed)`` with the standard library only, so
the same seed always gives the same world. Names and attribute values are invented,
pronounceable words (``Velmora``, ``Dorsk``) or small numbers, so a model can only answer
a knowledge question by reading the entity's passage, never from prior knowledge.

Each fact sentence puts a cue word right before its value ("The capital of Velmora is
Dorsk.", "People in Velmora speak Quenic."), which makes the value easy to copy.

Question wordings are split into ``train`` and ``heldout`` templates: held-out questions
use wordings that no train question uses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import NamedTuple

# Syllable pieces for invented names: a closed first syllable, a closed second syllable
# and an optional ending ("vel" + "mor" + "a" = "Velmora", "tash" + "kin" = "Tashkin").
# Consonant-heavy syllables keep the words away from English; COMMON_WORDS below rejects
# any accidental hit.
FIRST = ["vel", "tash", "dor", "zal", "quen", "bryn", "thal", "vask", "mir", "gor", "kel",
         "drav", "tav", "kyr", "zan", "ost", "ulv", "brak", "fen", "hald", "jor", "lis",
         "nev", "pell", "rusk", "sav", "tor", "varn", "wex", "yss", "zor", "ald", "esk",
         "ith", "orm", "keth"]
SECOND = ["mor", "kin", "rath", "vel", "dun", "sk", "zar", "wyn", "thor", "gal", "mir",
          "nok", "ras", "tiv", "quil", "bek", "lorn", "dris", "hask", "vun", "zek", "fol",
          "gren", "jask", "lom", "pask", "rev", "sul", "tok", "vys", "xan", "yor", "zim",
          "kor", "bel", "drum"]
ENTITY_ENDINGS = ["", "", "a", "o", "is", "en"]

# Typed endings for values, so e.g. languages look like languages ("Quenic"); languages
# use one syllable, everything else two.
POOL_SUFFIXES = {
    "city": ["", "", "holm", "grad"],
    "language": ["ic", "ish", "ese", "ari"],
    "good": ["ite", "on", "el", "ium"],
    "person": ["", "o", "a", "in"],
    "mountain": ["berg", "horn"],
    "sea": ["mere", "sund"],
    "region": ["land", "ova", "mark"],
    "book": ["ad", "ica", "ios"],
}
POOL_SIZES = {"city": 60, "language": 30, "good": 40, "person": 60,
              "mountain": 30, "sea": 20, "region": 30, "book": 40}

# A small guard list: invented words must never be common English words.
COMMON_WORDS = frozenset("""
a about after all also an and any are as at back band bank bar be bear been best big
bird book born both but by can car card city come could day dear did do does dog done
down each east even fall far farm few find fine first for from gave get give go good got
great had has have he her here him his home how i if in into is it its just keep kind
king know land last late led less let like line lion long look lord made make man many
may me men might more most much must my name near never new next no nor not now of off
old on once one only or other our out over own part people place rose said same saw say
sea see she should side so some son still such sun take than that the their them then
there these they this those though time to told too town two under up upon us use very
was water way we well went were west what when where which while who why will with word
work world would year yes yet you your able baron bison demon lemon melon metal nova
salon satan sonar taro toga tuba tuna zero zeta data gala lava mama papa pasta sofa
drama karma koala llama panda pizza rumba samba soda stark storm thor viking zen
""".split())

# Entity types: (intro sentence, {attribute: (value pool, fact sentence,
# train question wordings, held-out question wordings)}). "{e}" is the entity, "{v}" the
# value; in each fact sentence the cue word directly precedes "{v}".
Attribute = tuple[str, str, list[str], list[str]]
ENTITY_TYPES: dict[str, tuple[str, dict[str, Attribute]]] = {
    "country": ("{e} is a country.", {
        "capital": ("city", "The capital of {e} is {v}.",
                    ["What is the capital of {e}?", "Which city is the capital of {e}?"],
                    ["Name the capital of {e}.", "{e} has which city as its capital?"]),
        "language": ("language", "People in {e} speak {v}.",
                     ["What language do people in {e} speak?", "Which language is spoken in {e}?"],
                     ["What is the main language of {e}?",
                      "Name the language people speak in {e}."]),
        "founded": ("year", "{e} was founded in {v}.",
                    ["When was {e} founded?", "In which year was {e} founded?"],
                    ["What is the founding year of {e}?", "In what year did {e} come into being?"]),
        "export": ("good", "The main export of {e} is {v}.",
                   ["What is the main export of {e}?", "What does {e} export most?"],
                   ["Name the chief export of {e}.", "Which good does {e} mostly sell abroad?"]),
    }),
    "river": ("The {e} is a river.", {
        "length": ("number", "The {e} is {v} kilometres long.",
                   ["How long is the {e}?", "What is the length of the {e} in kilometres?"],
                   ["How many kilometres long is the {e}?", "Give the length of the {e}."]),
        "source": ("mountain", "The source of the {e} is {v}.",
                   ["Where is the source of the {e}?", "Where does the {e} rise?"],
                   ["Name the source of the {e}.", "From which mountain does the {e} start?"]),
        "mouth": ("sea", "The {e} flows into {v}.",
                  ["Into which sea does the {e} flow?", "Where does the {e} end?"],
                  ["What sea does the {e} empty into?", "Name the mouth of the {e}."]),
        "region": ("region", "The {e} flows through {v}.",
                   ["Which region does the {e} flow through?",
                    "Through which land does the {e} run?"],
                   ["Name the region the {e} crosses.", "What region lies along the {e}?"]),
    }),
    "company": ("{e} is a company.", {
        "founder": ("person", "{e} was founded by {v}.",
                    ["Who founded {e}?", "Who was the founder of {e}?"],
                    ["Name the founder of {e}.", "Which person started {e}?"]),
        "headquarters": ("city", "The headquarters of {e} are in {v}.",
                         ["Where are the headquarters of {e}?", "In which city is {e} based?"],
                         ["Name the city where {e} has its headquarters.",
                          "Where is {e} headquartered?"]),
        "founded": ("year", "{e} was founded in {v}.",
                    ["When was {e} founded?", "In which year was {e} founded?"],
                    ["What is the founding year of {e}?", "In what year did {e} come into being?"]),
        "product": ("good", "{e} makes {v}.",
                    ["What does {e} make?", "What product is {e} known for?"],
                    ["Name the main product of {e}.", "Which product does {e} manufacture?"]),
    }),
    "person": ("{e} is a person.", {
        "born": ("year", "{e} was born in the year {v}.",
                 ["When was {e} born?", "In which year was {e} born?"],
                 ["What is the birth year of {e}?", "In what year did {e} come into the world?"]),
        "birthplace": ("city", "The birthplace of {e} is {v}.",
                       ["Where was {e} born?", "What is the birthplace of {e}?"],
                       ["Name the town where {e} was born.", "In which city was {e} born?"]),
        "teacher": ("person", "The teacher of {e} was {v}.",
                    ["Who was the teacher of {e}?", "Who taught {e}?"],
                    ["Name the teacher of {e}.", "Under whom did {e} study?"]),
        "work": ("book", "{e} wrote {v}.",
                 ["What did {e} write?", "Which book did {e} write?"],
                 ["Name the best-known book by {e}.", "What is the famous work of {e}?"]),
    }),
}


class AttributeSpec(NamedTuple):
    """How one attribute is drawn, stated and asked about."""

    pool: str  # key of the value pool
    sentence: str  # fact sentence, cue word right before "{v}"
    train: list[str]  # question wordings used for training
    heldout: list[str]  # question wordings never used for training


def attribute_spec(entity_type: str, attr: str) -> AttributeSpec:
    """Return the spec of attribute ``attr`` of entity type ``entity_type``."""
    return AttributeSpec(*ENTITY_TYPES[entity_type][1][attr])


# No-knowledge tasks: (train wordings, held-out wordings).
GREETINGS = (["Say hello.", "Greet me."],
             ["Please say hello to me.", "Give me a friendly greeting."])
ARITHMETIC = (["What is {a} plus {b}?", "Add {a} and {b}."],
              ["What do you get if you add {a} to {b}?", "Compute the sum of {a} and {b}."])
REPEAT = (["Repeat the word {w}.", "Say the word {w}."],
          ["Echo this word: {w}.", "Please repeat {w} back to me."])
PER_WORDING = 20  # arithmetic and repeat questions generated per wording

SPLITS = ("train", "heldout")


@dataclass
class Entity:
    """One invented entity: its id, name, type and attribute values."""

    id: str
    name: str
    type: str
    attributes: dict[str, str]


@dataclass
class World:
    """A generated world: entities, one passage per entity, and all questions."""

    seed: int
    entities: list[Entity]
    passages: list[dict]
    all_questions: list[dict]
    pools: dict[str, list[str]] = field(default_factory=dict)

    def questions(self, split: str | None = None, kind: str | None = None) -> list[dict]:
        """Return the questions of one split ("train"/"heldout") and kind, or all of them."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [q for q in self.all_questions
                if (split is None or q["split"] == split) and (kind is None or q["kind"] == kind)]

    def invented_words(self) -> list[str]:
        """Return every invented word of the world: entity names and word-valued pools."""
        words = [e.name for e in self.entities]
        for pool in self.pools.values():
            words.extend(v for v in pool if not v.isdigit())
        return words

    def passage_by_id(self, passage_id: str) -> dict:
        """Return the passage with the given id (raises KeyError if there is none)."""
        for passage in self.passages:
            if passage["id"] == passage_id:
                return passage
        raise KeyError(passage_id)


def make_name(rng: random.Random, syllables: int = 2, suffix: str = "") -> str:
    """Return one invented word: ``syllables`` (1 or 2) syllables plus ``suffix``, capitalised."""
    word = rng.choice(FIRST) + (rng.choice(SECOND) if syllables == 2 else "")
    return (word + suffix).capitalize()


def unique_names(rng: random.Random, count: int, taken: set[str],
                 suffixes: list[str], syllables: int = 2) -> list[str]:
    """Draw ``count`` new invented words not in ``taken`` (which is updated) nor English."""
    names: list[str] = []
    while len(names) < count:
        name = make_name(rng, syllables, rng.choice(suffixes))
        if name in taken or name.lower() in COMMON_WORDS or not 4 <= len(name) <= 12:
            continue
        taken.add(name)
        names.append(name)
    return names


def make_pools(rng: random.Random, taken: set[str]) -> dict[str, list[str]]:
    """Build the typed value pools: invented words per type, plus years and lengths."""
    pools = {kind: unique_names(rng, size, taken, POOL_SUFFIXES[kind],
                                syllables=1 if kind == "language" else 2)
             for kind, size in POOL_SIZES.items()}
    pools["year"] = [str(y) for y in rng.sample(range(1000, 2000), 60)]
    pools["number"] = [str(n) for n in rng.sample(range(100, 1000), 60)]
    return pools


def make_entities(rng: random.Random, n_entities: int, pools: dict[str, list[str]],
                  taken: set[str]) -> list[Entity]:
    """Create ``n_entities`` entities with cycling types and 3-4 attributes each."""
    types = list(ENTITY_TYPES)
    names = unique_names(rng, n_entities, taken, ENTITY_ENDINGS)
    entities = []
    for i, name in enumerate(names):
        etype = types[i % len(types)]
        attrs = list(ENTITY_TYPES[etype][1])
        chosen = sorted(rng.sample(attrs, rng.choice((3, 4))), key=attrs.index)
        values = {a: rng.choice(pools[attribute_spec(etype, a).pool]) for a in chosen}
        entities.append(Entity(id=f"e{i:05d}", name=name, type=etype, attributes=values))
    return entities


def fact_sentence(entity: Entity, attr: str, value: str) -> str:
    """Return the sentence stating ``attr`` of ``entity`` is ``value`` (cue word before it)."""
    return attribute_spec(entity.type, attr).sentence.format(e=entity.name, v=value)


def make_passage(entity: Entity) -> dict:
    """Render an entity as an encyclopedia-style passage ``{"id", "title", "text"}``."""
    intro = ENTITY_TYPES[entity.type][0].format(e=entity.name)
    facts = [fact_sentence(entity, a, v) for a, v in entity.attributes.items()]
    return {"id": passage_id(entity), "title": entity.name, "text": " ".join([intro] + facts)}


def passage_id(entity: Entity) -> str:
    """Return the passage id of an entity's passage."""
    return "p" + entity.id[1:]


def knowledge_questions(entity: Entity) -> list[dict]:
    """Return one question per wording (train and held-out) for each attribute of ``entity``."""
    questions = []
    for attr, value in entity.attributes.items():
        spec = attribute_spec(entity.type, attr)
        for split, wordings in zip(SPLITS, (spec.train, spec.heldout)):
            for t, template in enumerate(wordings):
                questions.append({
                    "id": f"{entity.id}-{attr}-{split}{t}",
                    "instruction": template.format(e=entity.name),
                    "answers": [value],
                    "gold_passage_id": passage_id(entity),
                    "kind": "knowledge",
                    "split": split,
                    "template": template,
                })
    return questions


def no_knowledge_questions(rng: random.Random, words: list[str]) -> list[dict]:
    """Return greeting, small-arithmetic and repeat-a-word questions for both splits."""
    questions = []

    def add(qid: str, instruction: str, answer: str, split: str, template: str) -> None:
        questions.append({"id": qid, "instruction": instruction, "answers": [answer],
                          "gold_passage_id": None, "kind": "no_knowledge", "split": split,
                          "template": template})

    for s, split in enumerate(SPLITS):
        for t, template in enumerate(GREETINGS[s]):
            add(f"greet-{split}{t}", template, "Hello!", split, template)
        for t, template in enumerate(ARITHMETIC[s]):
            for n in range(PER_WORDING):
                a, b = rng.randint(1, 9), rng.randint(1, 9)
                add(f"add-{split}{t}-{n:02d}", template.format(a=a, b=b), str(a + b),
                    split, template)
        for t, template in enumerate(REPEAT[s]):
            for n in range(PER_WORDING):
                word = rng.choice(words)
                add(f"repeat-{split}{t}-{n:02d}", template.format(w=word), word, split, template)
    return questions


def build_world(seed: int = 0, n_entities: int = 300) -> World:
    """Generate the whole world for ``seed``: same seed, identical world; new seed, new world."""
    rng = random.Random(seed)
    taken: set[str] = set()
    pools = make_pools(rng, taken)
    entities = make_entities(rng, n_entities, pools, taken)
    passages = [make_passage(e) for e in entities]
    questions = [q for e in entities for q in knowledge_questions(e)]
    questions += no_knowledge_questions(rng, sorted(taken))
    return World(seed=seed, entities=entities, passages=passages,
                 all_questions=questions, pools=pools)
