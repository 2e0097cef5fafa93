"""Two synthetic languages over one small world, and a question-answering task.

The world: ``N_OBJECTS`` objects, each with a fixed colour and a fixed place; people
(their names shared by both languages) do things with them. L1 and L2 state the same
facts with different words, letters and morphology (docs/lab.md shows examples):

- L1: Latin script, English-like: ``the duge is muze .``, ``the duge is in the rulu .``,
  ``the colour of the duge is muze .``;
- L2: Greek script, its own lexicon, no articles, a locative suffix ``-ρα`` and a
  genitive suffix ``-ου`` glued to the word: ``βωψε εστι δηγε .``,
  ``βωψε εστι φιπυρα .``, ``χρωμ βωψεου εστι δηγε .``.

The same random draws give the same sentence in both languages (a translation). The
lexicon and the world are fixed (``WORLD_SEED``); the run's seed only draws sentences.

The task is closed-book question answering about the world. With ``TEMPLATE =
"shared"`` (the lab's) the question uses a chat template shared by both languages, as an
instruction model's template is, with the content in one language:
``<q> duge <colour> <a>`` → ``muze``, ``<q> βωψε <colour> <a>`` → ``δηγε``. With
``"own"`` each language asks in its own words (``<q> the colour of the duge ? <a>``,
``<q> χρωμ βωψεου ? <a>``); in a pilot no merge then rose clearly above chance in L2.
A question is answered by ranking the language's colour (or place) words by the model's
likelihood (chance = 1 / 8). The SFT data are the L1 questions about the first
``N_TRAIN_OBJECTS`` objects; accuracy is measured on the others (held out).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

WORLD_SEED = 1234
N_OBJECTS = 80
N_TRAIN_OBJECTS = 40
N_COLOURS = 8
N_PLACES = 8
N_AGENTS = 12
N_VERBS = 4
TEMPLATE = "shared"   # or "own" (see above)

_LATIN_C = "bdfgklmnprstvz"
_LATIN_V = "aeiou"
_GREEK_C = "βγδζθκλμνξπρστφχψ"
_GREEK_V = "αεηιουω"


def _words(rng: random.Random, n: int, consonants: str, vowels: str, taken: set) -> list:
    out = []
    while len(out) < n:
        w = "".join(rng.choice(consonants) + rng.choice(vowels)
                    for _ in range(rng.choice((2, 2, 3))))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


@dataclass(frozen=True)
class Lexicon:
    objects: list
    colours: list
    places: list
    agents: list
    verbs: list
    func: dict      # function words and affixes: is_, colour, place, gen, loc


@dataclass(frozen=True)
class World:
    l1: Lexicon
    l2: Lexicon
    colour: list    # colour index of each object
    place: list     # place index of each object


def make_world() -> World:
    rng = random.Random(WORLD_SEED)
    lex = []
    agents = _words(rng, N_AGENTS, _LATIN_C, _LATIN_V, set())   # names: shared
    for cons, vow, func in (
            (_LATIN_C, _LATIN_V, dict(is_="is", colour="colour", place="place", gen=None,
                                      loc=None)),
            (_GREEK_C, _GREEK_V, dict(is_="εστι", colour="χρωμ", place="τοπ", gen="ου",
                                      loc="ρα"))):
        taken = set(agents)
        lex.append(Lexicon(objects=_words(rng, N_OBJECTS, cons, vow, taken),
                           colours=_words(rng, N_COLOURS, cons, vow, taken),
                           places=_words(rng, N_PLACES, cons, vow, taken),
                           agents=agents,
                           verbs=_words(rng, N_VERBS, cons, vow, taken), func=func))
    colour = [rng.randrange(N_COLOURS) for _ in range(N_OBJECTS)]
    place = [rng.randrange(N_PLACES) for _ in range(N_OBJECTS)]
    return World(lex[0], lex[1], colour, place)


def sentence(world: World, lang: str, rng: random.Random) -> str:
    """One random true sentence about the world in ``lang`` ("l1" or "l2")."""
    o, o2 = rng.randrange(N_OBJECTS), rng.randrange(N_OBJECTS)
    a, v, kind = rng.randrange(N_AGENTS), rng.randrange(N_VERBS), rng.randrange(7)
    x = world.l1 if lang == "l1" else world.l2
    O, C, P = x.objects[o], x.colours[world.colour[o]], x.places[world.place[o]]
    O2, C2 = x.objects[o2], x.colours[world.colour[o2]]
    A, V, f = x.agents[a], x.verbs[v], x.func
    if lang == "l1":
        return [f"the {O} is {C} .", f"the {O} is in the {P} .",
                f"the {C} {O} is in the {P} .", f"{A} {V} the {C} {O} .",
                f"{A} {V} the {O} in the {P} .", f"the colour of the {O} is {C} .",
                f"the place of the {O} is the {P} ; {A} {V} the {C2} {O2} ."][kind]
    IS, LOC, GEN = f["is_"], P + f["loc"], O + f["gen"]
    return [f"{O} {IS} {C} .", f"{O} {IS} {LOC} .", f"{C} {O} {IS} {LOC} .",
            f"{A} {V} {C} {O} .", f"{A} {V} {O} {LOC} .", f"{f['colour']} {GEN} {IS} {C} .",
            f"{f['place']} {GEN} {IS} {P} ; {A} {V} {C2} {O2} ."][kind]


def document(world: World, lang: str, rng: random.Random, n_sentences: int = 8) -> str:
    """``n_sentences`` random sentences in ``lang``."""
    return " ".join(sentence(world, lang, rng) for _ in range(n_sentences))


def question(world: World, lang: str, obj: int, attr: str) -> tuple[str, str, list]:
    """(prompt, answer, candidates) for the question about ``attr`` ("colour" or
    "place") of object ``obj`` in ``lang``."""
    x = world.l1 if lang == "l1" else world.l2
    names = x.colours if attr == "colour" else x.places
    answer = names[world.colour[obj] if attr == "colour" else world.place[obj]]
    if TEMPLATE == "shared":
        prompt = f"<q> {x.objects[obj]} <{attr}> <a>"
    elif lang == "l1":
        prompt = f"<q> the {x.func[attr]} of the {x.objects[obj]} ? <a>"
    else:
        prompt = f"<q> {x.func[attr]} {x.objects[obj]}{x.func['gen']} ? <a>"
    return prompt, answer, list(names)


def cloze(world: World, lang: str, obj: int, attr: str) -> tuple[str, str, list]:
    """The same fact as a sentence to complete, in the language's own words (no template):
    what the language model knows, before any task tuning."""
    x = world.l1 if lang == "l1" else world.l2
    _, answer, names = question(world, lang, obj, attr)
    if lang == "l1":
        prompt = (f"the {x.func[attr]} of the {x.objects[obj]} is"
                  + (" the" if attr == "place" else ""))
    else:
        prompt = f"{x.func[attr]} {x.objects[obj]}{x.func['gen']} {x.func['is_']}"
    return prompt, answer, names


def clozes(world: World, lang: str, objects) -> list:
    """The cloze sentences of both attributes of each object."""
    return [cloze(world, lang, o, attr) for o in objects for attr in ("colour", "place")]


def questions(world: World, lang: str, objects) -> list:
    """The questions about both attributes of each object."""
    return [question(world, lang, o, attr) for o in objects for attr in ("colour", "place")]


def train_objects() -> range:
    return range(N_TRAIN_OBJECTS)


def test_objects() -> range:
    return range(N_TRAIN_OBJECTS, N_OBJECTS)
