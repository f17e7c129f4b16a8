"""A deterministic synthetic knowledge world: invented entities, passages and questions.

Two layers, both generated with ``random.Random`` and the standard library only:

- the **lexicon** (fixed, from ``LEXICON_SEED``): every invented word that can ever appear,
  i.e. 1,000 entity names and typed value pools (cities, languages, goods, ...), plus years
  and lengths. The tiny model's tokenizer makes each of these words one token, so copying
  an answer out of a passage is copying one token;
- a **world** (from ``seed``): entities drawn from the lexicon with random attribute values,
  one passage each, and questions about them. The same seed always gives the same world.
  Training draws a fresh random entity for every example (``random_entity``), so knowing a
  fact can only come from reading its passage, never from memorising.

Every fact sentence reads "The {noun} of {entity} is {value}.", and knowledge questions name
the same noun ("What is the capital of Velmora?"). Question wordings (frames) are split:
held-out questions use frames that no training question uses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

LEXICON_SEED = 20241
N_NAMES = 1000  # entity names in the lexicon

# Syllable pieces for invented names: a closed first syllable, a second syllable and an
# optional ending ("vel" + "mor" + "a" = "Velmora"). Consonant-heavy syllables keep the
# words away from English; COMMON_WORDS rejects any accidental hit.
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

# Entity types: intro sentence and attributes {name: (noun in sentences and questions, pool)}.
ENTITY_TYPES: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "country": ("{e} is a country.", {
        "capital": ("capital", "city"), "language": ("language", "language"),
        "founded": ("founding year", "year"), "export": ("main export", "good")}),
    "river": ("{e} is a river.", {
        "length": ("length in kilometres", "number"), "source": ("source", "mountain"),
        "mouth": ("mouth", "sea"), "region": ("region", "region")}),
    "company": ("{e} is a company.", {
        "founder": ("founder", "person"), "headquarters": ("headquarters", "city"),
        "founded": ("founding year", "year"), "product": ("main product", "good")}),
    "person": ("{e} is a person.", {
        "born": ("birth year", "year"), "birthplace": ("birthplace", "city"),
        "teacher": ("teacher", "person"), "work": ("best known book", "book")}),
}
FACT_SENTENCE = "The {n} of {e} is {v}."

# Knowledge-question frames ({n}: attribute noun, {e}: entity). Held-out frames are built
# from words the training frames use, in orders that no training question has.
KNOWLEDGE_FRAMES = {
    "train": ["What is the {n} of {e}?", "Tell me the {n} of {e}.", "Which is the {n} of {e}?",
              "I want to know the {n} of {e}.", "For {e}, what is the {n}?",
              "Do you know the {n} of {e} well?", "About {e}: tell me its {n}."],
    "heldout": ["Please tell me the {n} of {e}.", "Do you know what the {n} of {e} is?"],
}
# No-knowledge tasks: {split: wordings}.
# Every opening a knowledge frame uses ("Tell me", "What is", "Do you know", "I want") also
# opens some no-knowledge training wording, so that the opening alone never decides.
GREETINGS = {"train": ["Say hello.", "Greet me.", "Please say hello to me.", "Tell me hello.",
                       "Say hi to me.", "Greet me, please."],
             "heldout": ["Please greet me.", "Say hello to me."]}
ARITHMETIC = {"train": ["What is {a} plus {b}?", "Add {a} and {b}.", "Please add {a} and {b}.",
                        "Tell me the sum of {a} and {b}.", "I want to know {a} plus {b}."],
              "heldout": ["Tell me what {a} plus {b} is.", "What do you know {a} plus {b} is?"]}
REPEAT = {"train": ["Repeat the word {w}.", "Say the word {w}.", "Please repeat the word {w}.",
                    "Tell me back the word {w}.", "Do you know the word {w}? Say it.",
                    "Give me the word {w}.", "Write the word {w}.", "I want the word {w} repeated."],
          "heldout": ["Tell me the word {w}.", "Say {w} to me."]}
# Long-form questions (task "asqa"): two attributes of one entity, answered in two segments,
# each after its own retrieval: "The {n1} of {e} is {v1}." then "The {n2} of {e} is {v2}.".
LONG_FORM_FRAMES = {
    "train": ["What are the {n1} and the {n2} of {e}?", "Tell me the {n1} and the {n2} of {e}.",
              "Describe the {n1} and the {n2} of {e}.", "For {e}, give the {n1} and the {n2}."],
    "heldout": ["Please describe the {n1} and the {n2} of {e}.", "I want to know the {n1} and the {n2} of {e}."],
}
LONG_FORM_TASK = "asqa"
#: The prompt style the tiny model's training examples use for templated tasks (the paper's
#: wording, joined with a blank line); runs of that model set ``selfrag.prompt_style`` to it.
TRAINED_PROMPT_STYLE = "paper"
PER_WORDING = 20  # arithmetic and repeat questions generated per wording

SPLITS = ("train", "heldout")


class AttributeSpec(NamedTuple):
    """How one attribute is stated and asked about."""

    noun: str  # "capital", "founding year": used in the fact sentence and in questions
    pool: str  # key of the value pool


def attribute_spec(entity_type: str, attr: str) -> AttributeSpec:
    """Return the spec of attribute ``attr`` of entity type ``entity_type``."""
    return AttributeSpec(*ENTITY_TYPES[entity_type][1][attr])


@dataclass
class Entity:
    """One invented entity: its id, name, type and attribute values."""

    id: str
    name: str
    type: str
    attributes: dict[str, str]


@dataclass
class Lexicon:
    """Every invented word: entity names and typed value pools (years and lengths too)."""

    names: list[str]
    pools: dict[str, list[str]]

    def words(self) -> list[str]:
        """All invented words (names and word-valued pools), without numbers."""
        return self.names + [v for pool in self.pools.values() for v in pool if not v.isdigit()]


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


@lru_cache(maxsize=1)
def lexicon() -> Lexicon:
    """The fixed lexicon (same for every world): typed value pools, years, lengths, names."""
    rng = random.Random(LEXICON_SEED)
    taken: set[str] = set()
    pools = {kind: unique_names(rng, size, taken, POOL_SUFFIXES[kind],
                                syllables=1 if kind == "language" else 2)
             for kind, size in POOL_SIZES.items()}
    pools["year"] = [str(y) for y in rng.sample(range(1000, 2000), 60)]
    pools["number"] = [str(n) for n in rng.sample(range(100, 1000), 60)]
    return Lexicon(names=unique_names(rng, N_NAMES, taken, ENTITY_ENDINGS), pools=pools)


def random_entity(rng: random.Random, entity_id: str, name: str | None = None,
                  entity_type: str | None = None) -> Entity:
    """A fresh entity: a lexicon name, a type, and 3-4 attributes with random pool values."""
    lex = lexicon()
    etype = entity_type or rng.choice(list(ENTITY_TYPES))
    attrs = list(ENTITY_TYPES[etype][1])
    chosen = sorted(rng.sample(attrs, rng.choice((3, 4))), key=attrs.index)
    values = {a: rng.choice(lex.pools[attribute_spec(etype, a).pool]) for a in chosen}
    return Entity(id=entity_id, name=name or rng.choice(lex.names), type=etype, attributes=values)


def make_entities(rng: random.Random, n_entities: int) -> list[Entity]:
    """Create ``n_entities`` entities with distinct names and cycling types."""
    names = rng.sample(lexicon().names, n_entities)
    types = list(ENTITY_TYPES)
    return [random_entity(rng, f"e{i:05d}", name, types[i % len(types)])
            for i, name in enumerate(names)]


def fact_sentence(entity: Entity, attr: str, value: str) -> str:
    """Return the sentence stating ``attr`` of ``entity`` is ``value``."""
    return FACT_SENTENCE.format(n=attribute_spec(entity.type, attr).noun, e=entity.name, v=value)


def passage_text(entity: Entity, attributes: dict[str, str] | None = None) -> str:
    """An entity's passage text: intro sentence, then one fact sentence per attribute."""
    attributes = entity.attributes if attributes is None else attributes
    intro = ENTITY_TYPES[entity.type][0].format(e=entity.name)
    return " ".join([intro] + [fact_sentence(entity, a, v) for a, v in attributes.items()])


def make_passage(entity: Entity) -> dict:
    """Render an entity as an encyclopedia-style passage ``{"id", "title", "text"}``."""
    return {"id": passage_id(entity), "title": entity.name, "text": passage_text(entity)}


def passage_id(entity: Entity) -> str:
    """Return the passage id of an entity's passage."""
    return "p" + entity.id[1:]


def question_text(entity: Entity, attr: str, frame: str) -> str:
    """A knowledge question about ``attr`` of ``entity`` in the given frame."""
    return frame.format(n=attribute_spec(entity.type, attr).noun, e=entity.name)


def long_form_question_text(entity: Entity, attrs: tuple[str, str], frame: str) -> str:
    """A long-form question about two attributes of ``entity`` (in the given order)."""
    n1, n2 = (attribute_spec(entity.type, a).noun for a in attrs)
    return frame.format(n1=n1, n2=n2, e=entity.name)


def long_form_questions(entity: Entity) -> list[dict]:
    """Return long-form questions about consecutive attribute pairs of ``entity``, in both
    orders (so the answer's order follows the question, not the passage), one frame each,
    cycling through the frames of each split."""
    attrs = list(entity.attributes)
    pairs = list(zip(attrs, attrs[1:]))
    pairs += [(b, a) for a, b in pairs]
    questions = []
    for split in SPLITS:
        frames = LONG_FORM_FRAMES[split]
        for t, pair in enumerate(pairs):
            frame = frames[t % len(frames)]
            questions.append({
                "id": f"{entity.id}-{pair[0]}+{pair[1]}-{split}{t % len(frames)}",
                "instruction": long_form_question_text(entity, pair, frame),
                "answers": [entity.attributes[a] for a in pair],
                "gold_passage_id": passage_id(entity),
                "kind": "long_form",
                "split": split,
                "template": frame,
                "attribute": "+".join(pair),
                "task": LONG_FORM_TASK,
            })
    return questions


def knowledge_questions(entity: Entity) -> list[dict]:
    """Return one question per frame (train and held-out) for each attribute of ``entity``."""
    questions = []
    for attr, value in entity.attributes.items():
        for split in SPLITS:
            for t, frame in enumerate(KNOWLEDGE_FRAMES[split]):
                questions.append({
                    "id": f"{entity.id}-{attr}-{split}{t}",
                    "instruction": question_text(entity, attr, frame),
                    "answers": [value],
                    "gold_passage_id": passage_id(entity),
                    "kind": "knowledge",
                    "split": split,
                    "template": frame,
                    "attribute": attr,
                })
    return questions


def no_knowledge_question(rng: random.Random, template: str, words: list[str]) -> tuple[str, str]:
    """(question, answer) for a greeting, sum or repeat-the-word template."""
    if "{w}" in template:
        word = rng.choice(words)
        return template.format(w=word), word
    if "{a}" in template:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return template.format(a=a, b=b), str(a + b)
    return template, "Hello!"


def no_knowledge_questions(rng: random.Random, words: list[str]) -> list[dict]:
    """Return greeting, small-arithmetic and repeat-a-word questions for both splits."""
    questions = []
    for split in SPLITS:
        for prefix, templates, count in (("greet", GREETINGS, 1), ("add", ARITHMETIC, PER_WORDING),
                                         ("repeat", REPEAT, PER_WORDING)):
            for t, template in enumerate(templates[split]):
                for n in range(count):
                    instruction, answer = no_knowledge_question(rng, template, words)
                    suffix = f"-{n:02d}" if count > 1 else ""
                    questions.append({
                        "id": f"{prefix}-{split}{t}{suffix}", "instruction": instruction,
                        "answers": [answer], "gold_passage_id": None, "kind": "no_knowledge",
                        "split": split, "template": template, "attribute": None})
    return questions


def build_world(seed: int = 0, n_entities: int = 300) -> World:
    """Generate the whole world for ``seed``: same seed, identical world; new seed, new world."""
    rng = random.Random(seed)
    entities = make_entities(rng, n_entities)
    passages = [make_passage(e) for e in entities]
    questions = [q for e in entities for q in knowledge_questions(e)]
    questions += [q for e in entities for q in long_form_questions(e)]
    questions += no_knowledge_questions(rng, lexicon().words())
    return World(seed=seed, entities=entities, passages=passages,
                 all_questions=questions, pools=lexicon().pools)
