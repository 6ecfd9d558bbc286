"""A seeded, held-out document set with questions, to measure external retrieval (recall@k).

Each document is the fact sheet of an invented organisation (names built from syllables, so no model or
index has seen them; organisations come in pairs sharing a first word, "Velmora Robotics" and "Velmora
Textiles", so the name alone does not pick the document). A sheet states eight attributes, some sentences
naming the organisation and some saying "It ...", among boilerplate shared by all sheets. A question asks
for one attribute, in words other than the sheet's ("established" for "founded") and, for two thirds of
the questions, with a typo in the organisation's name, as users type. The gold answer is the sentence that
states the attribute; a retrieved chunk is a hit when it contains that whole sentence.

The bench (``bench/memory_store.py``) and the test (``tests/memory/test_documents_recall.py``) use it with
different seeds; no part of the store was tuned on a seed the test uses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_SYLLABLES = ["ka", "ve", "lo", "mir", "dan", "tes", "ro", "qui", "zel", "bar", "nor", "fi", "gal", "hu", "sor",
              "ten", "ul", "pra", "vin", "mo", "del", "cas", "tri", "yen", "bo", "ram", "ish", "ler", "pon", "wex"]
_KINDS = ["Robotics", "Textiles", "Observatory", "Cooperative", "Foundry", "Institute", "Brewery", "Shipyard",
          "Orchestra", "Pharmacy", "Archive", "Seedbank", "Clinic", "Studios", "Logistics", "Ceramics"]
_CITIES = ["Lisbon", "Tampere", "Cordoba", "Graz", "Nantes", "Bergen", "Ljubljana", "Porto", "Utrecht", "Brno",
           "Aarhus", "Bilbao", "Krakow", "Tartu", "Ghent", "Malmo", "Trieste", "Cork", "Leuven", "Split"]
_FIRST = ["Amara", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hugo", "Ingrid", "Jonas", "Keiko",
          "Lucia", "Mateo", "Nadia", "Oskar", "Priya", "Rafael", "Sanna", "Tomas", "Yara"]
_LAST = ["Okafor", "Lindqvist", "Moreau", "Petrov", "Yilmaz", "Haddad", "Novak", "Castillo", "Berg", "Tanaka",
         "Rossi", "Kowalski", "Fischer", "Silva", "Horvat", "Jensen", "Dubois", "Ivanova", "Mendes", "Weber"]
_PRODUCTS = ["hydraulic valves", "wool blankets", "star charts", "oat milk", "bronze bells", "soil sensors",
             "river barges", "violin strings", "herbal tinctures", "archival boxes", "glass lenses",
             "rope bridges", "cargo drones", "clay tiles", "weather balloons", "sourdough starters"]
_BOILERPLATE = ["This sheet is kept by the regional records office.",
                "Figures are reviewed once a year and may change.",
                "Questions about the sheet go to the records desk.",
                "The office does not endorse any organisation listed.",
                "Sheets are published in the spring and corrected in the autumn.",
                "Readers who spot an error are asked to write to the office.",
                "Older versions of this sheet are kept in the basement archive.",
                "The records office is open on weekdays from nine to five."]
# history-like sentences without facts, so a sheet spans several chunks and facts sit among noise
_FILLER = ["In its early years the organisation grew slowly and changed its plans more than once.",
           "Several of the first members still visit the old building every summer.",
           "The organisation publishes a short newsletter for its friends and neighbours.",
           "A small garden behind the main building is looked after by volunteers.",
           "Visitors are welcome on the first Saturday of each month, by appointment.",
           "Its early accounts were written by hand in large green ledgers.",
           "During the winter months most of the work moves indoors.",
           "The local press has covered its open days for many years.",
           "Staff meetings take place every second Monday in the long hall.",
           "A mural in the entrance shows the founders at work.",
           "The organisation has twice moved to a larger building nearby.",
           "Apprentices spend their first weeks shadowing experienced colleagues.",
           "A long table in the canteen seats everyone at lunch on Fridays.",
           "The building's roof was repaired after a storm some years ago.",
           "Old photographs of the first workshop hang along the stairs.",
           "Neighbours sometimes borrow the big hall for weddings and concerts.",
           "The organisation keeps a small library that anyone may use.",
           "A brass plaque by the door lists the names of past chairs.",
           "Every autumn the whole team walks to the hill behind the town.",
           "The accounts are audited by an outside firm every spring."]

# attribute -> (sentence in the sheet: "{name}" or a pronoun, question phrasings)
_ATTRIBUTES: dict[str, tuple[str, list[str]]] = {
    "founded": ("{subj} was founded in {value}.", ["What year was {name} established?",
                                                   "When was the founding of {name}?"]),
    "city": ("{subj} has its headquarters in {value}.", ["Where is {name} based?",
                                                         "Which city is {name} headquartered in?"]),
    "director": ("{subj} is directed by {value}.", ["Who runs {name}?", "Who is the director of {name}?"]),
    "staff": ("{subj} employs {value} people.", ["How many employees does {name} have?",
                                                 "How many staff are employed at {name}?"]),
    "product": ("{subj} is best known for its {value}.", ["What does {name} make?",
                                                          "What is {name} famous for producing?"]),
    "budget": ("The annual budget of {subj_of} is {value} million euros.",
               ["How much money does {name} spend each year?", "What is the yearly budget of {name}?"]),
    "partner": ("{subj} works closely with {value}.", ["Which organisation partners with {name}?",
                                                       "Who does {name} work with?"]),
    "motto": ("The motto of {subj_of} is \"{value}\".", ["What slogan does {name} use?",
                                                          "What is the motto of {name}?"]),
}
_MOTTO_WORDS = ["steady", "bright", "open", "deep", "careful", "bold", "quiet", "shared", "honest", "patient"]


@dataclass(frozen=True)
class Question:
    text: str
    doc_name: str
    gold: str          # the sentence of the sheet that answers it
    typo: bool


@dataclass(frozen=True)
class RetrievalSet:
    documents: list[tuple[str, str]]   # (name, text)
    questions: list[Question]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _typo(rng: random.Random, word: str) -> str:
    """A mistyped ``word``: one edit (swap, drop, double or replace a letter) anywhere, and 40% of the time
    a second one, as users type."""
    word = _one_typo(rng, word)
    return _one_typo(rng, word) if rng.random() < 0.4 else word


def _one_typo(rng: random.Random, word: str) -> str:
    i = rng.randrange(0, len(word) - 1)
    edit = rng.choice(["swap", "drop", "double", "replace"])
    if edit == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if edit == "drop":
        return word[:i] + word[i + 1:]
    if edit == "double":
        return word[:i] + word[i] + word[i:]
    return word[:i] + rng.choice("aeioulnrst".replace(word[i].lower(), "")) + word[i + 1:]


def build_retrieval_set(seed: int, n_documents: int = 60, questions_per_document: int = 2) -> RetrievalSet:
    rng = random.Random(seed)
    names: list[str] = []
    used: set[str] = set()
    while len(names) < n_documents:
        first = _word(rng)
        if first in used or len(first) < 5:
            continue
        used.add(first)
        for kind in rng.sample(_KINDS, 2):   # pairs share the first word of their name
            names.append(f"{first} {kind}")
    names = names[:n_documents]
    documents, questions = [], []
    for name in names:
        values = {
            "founded": str(rng.randint(1890, 2021)),
            "city": rng.choice(_CITIES),
            "director": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
            "staff": str(rng.randint(12, 4000)),
            "product": rng.choice(_PRODUCTS),
            "budget": str(rng.randint(2, 900)),
            "partner": rng.choice([n for n in names if n != name]),
            "motto": " and ".join(rng.sample(_MOTTO_WORDS, 2)).capitalize(),
        }
        order = list(_ATTRIBUTES)
        rng.shuffle(order)
        sentences: dict[str, str] = {}
        for position, attribute in enumerate(order):
            named = position % 3 == 0   # a third of the sentences name the organisation; the rest say "It"
            template = _ATTRIBUTES[attribute][0]
            sentences[attribute] = template.format(subj=name if named else "It", subj_of=name if named else "it",
                                                   value=values[attribute])
            if not named:
                sentences[attribute] = sentences[attribute][0].upper() + sentences[attribute][1:]
        body = [sentences[a] for a in order]
        half = len(body) // 2
        filler = rng.sample(_FILLER, 16)

        def mixed(facts: list[str], noise: list[str]) -> str:
            sentences_out = facts + noise
            rng.shuffle(sentences_out)
            return " ".join(sentences_out)

        paragraphs = [f"{name}: fact sheet.",
                      f"{name} is a {name.split()[1].lower()} organisation. " + mixed(body[:2], filler[:4]),
                      " ".join(rng.sample(_BOILERPLATE, 3)),
                      f"Some history of {name}. " + mixed(body[2:half], filler[4:8]),
                      " ".join(rng.sample(_BOILERPLATE, 3)),
                      f"More about {name}. " + mixed(body[half:6], filler[8:12]),
                      " ".join(rng.sample(_BOILERPLATE, 3)),
                      f"Last notes on {name}. " + mixed(body[6:], filler[12:]),
                      " ".join(rng.sample(_BOILERPLATE, 3))]
        doc_name = name.lower().replace(" ", "-") + ".md"
        documents.append((doc_name, "\n\n".join(paragraphs)))
        for attribute in rng.sample(order, questions_per_document):
            typo = rng.random() < 2 / 3
            first, rest = name.split(" ", 1)
            asked = f"{_typo(rng, first)} {rest}" if typo else name
            question = rng.choice(_ATTRIBUTES[attribute][1]).format(name=asked)
            questions.append(Question(question, doc_name, sentences[attribute], typo))
    return RetrievalSet(documents, questions)


def recall_at_k(store, user: str, retrieval_set: RetrievalSet, k: int = 5, mode: str = "fused") -> float:
    """Share of questions whose gold sentence lies whole in one of the top-``k`` chunks of its document."""
    hits = 0
    for question in retrieval_set.questions:
        found = store.search_documents(user, question.text, k=k, mode=mode)
        hits += any(h.name == question.doc_name and question.gold in h.text for h in found)
    return hits / len(retrieval_set.questions)
