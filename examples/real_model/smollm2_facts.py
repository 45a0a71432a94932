"""Short factual prompts that a 135M instruct model can answer, and their checker.

Two families, written here offline: the capital of a country and the opposite of a word, each
asked in four phrasings. The facts are split once (by a fixed rule, not at random) into training
facts and held-out facts, so that validation asks about facts no training prompt mentions.

``compute_score`` is the checker on the student's own answers, with the signature of a reward
function (``custom_reward_function.path`` = this file): 1.0 when the answer contains one of the
accepted answers as a whole word (case and accents ignored), else 0.0. On GAD data the trainer
only uses it for validation, where it is logged as ``val/reward`` (greedy answers).
"""

from __future__ import annotations

import random
import re
import unicodedata

DATA_SOURCE = "smollm2_facts"

# (country, accepted answers separated by "|")
CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("the United Kingdom", "London"), ("Ireland", "Dublin"),
    ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Austria", "Vienna"),
    ("Switzerland", "Bern|Berne"), ("Poland", "Warsaw"), ("the Czech Republic", "Prague"),
    ("Hungary", "Budapest"), ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Iceland", "Reykjavik"),
    ("Russia", "Moscow"), ("Ukraine", "Kyiv|Kiev"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Turkey", "Ankara"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"),
    ("Ghana", "Accra"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi|Delhi"),
    ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"), ("Pakistan", "Islamabad"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Afghanistan", "Kabul"),
    ("Nepal", "Kathmandu"), ("Bangladesh", "Dhaka"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("Canada", "Ottawa"), ("the United States", "Washington"),
    ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
    ("Chile", "Santiago"), ("Peru", "Lima"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"),
    ("Cuba", "Havana"), ("Jamaica", "Kingston"), ("Ecuador", "Quito"), ("Uruguay", "Montevideo"),
    ("Lebanon", "Beirut"), ("Syria", "Damascus"), ("Jordan", "Amman"), ("Qatar", "Doha"),
    ("Mongolia", "Ulaanbaatar|Ulan Bator"), ("Cambodia", "Phnom Penh"), ("Laos", "Vientiane"),
    ("Tunisia", "Tunis"), ("Algeria", "Algiers"), ("Libya", "Tripoli"), ("Sudan", "Khartoum"),
    ("Senegal", "Dakar"), ("Zimbabwe", "Harare"), ("Uganda", "Kampala"), ("Angola", "Luanda"),
    ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Slovakia", "Bratislava"),
    ("Slovenia", "Ljubljana"), ("Belarus", "Minsk"), ("Georgia", "Tbilisi"), ("Armenia", "Yerevan"),
    ("Azerbaijan", "Baku"), ("Uzbekistan", "Tashkent"), ("Malta", "Valletta"), ("Cyprus", "Nicosia"),
)

# (word, accepted opposites separated by "|")
OPPOSITES = (
    ("hot", "cold"), ("big", "small|little"), ("tall", "short"), ("fast", "slow"),
    ("happy", "sad|unhappy"), ("up", "down"), ("day", "night"), ("dark", "light|bright"),
    ("open", "closed|shut|close"), ("old", "young|new"), ("rich", "poor"), ("hard", "soft|easy"),
    ("wet", "dry"), ("full", "empty"), ("early", "late"), ("strong", "weak"), ("loud", "quiet|soft"),
    ("love", "hate"), ("good", "bad|evil"), ("true", "false"), ("win", "lose"), ("high", "low"),
    ("thick", "thin"), ("heavy", "light"), ("clean", "dirty"), ("push", "pull"),
    ("begin", "end|finish"), ("buy", "sell"), ("give", "take|receive"), ("inside", "outside"),
    ("above", "below|beneath|under"), ("first", "last"), ("north", "south"), ("east", "west"),
    ("black", "white"), ("wide", "narrow"), ("deep", "shallow"), ("cheap", "expensive"),
    ("safe", "dangerous|unsafe"), ("friend", "enemy|foe"), ("remember", "forget"),
    ("accept", "reject|refuse|decline"), ("increase", "decrease|reduce"), ("always", "never"),
    ("asleep", "awake"), ("alive", "dead"), ("summer", "winter"), ("future", "past"),
    ("king", "queen"), ("boy", "girl"), ("man", "woman"), ("husband", "wife"),
    ("sharp", "dull|blunt"), ("smooth", "rough"), ("entrance", "exit"), ("positive", "negative"),
    ("victory", "defeat|loss"), ("success", "failure"), ("laugh", "cry"), ("polite", "rude|impolite"),
    ("possible", "impossible"), ("visible", "invisible"), ("maximum", "minimum"),
    ("ancient", "modern"), ("private", "public"), ("import", "export"), ("include", "exclude"),
    ("majority", "minority"), ("sunrise", "sunset"), ("arrive", "leave|depart"),
    ("sweet", "sour|bitter"), ("brave", "cowardly|coward|afraid|scared|fearful"),
    ("near", "far"), ("more", "less|fewer"), ("before", "after"),
)

CAPITAL_PHRASINGS = ("What is the capital of {x}?", "What is the capital city of {x}?",
                     "Name the capital of {x}.", "Which city is the capital of {x}?")
OPPOSITE_PHRASINGS = ("What is the opposite of {x}?", "What is the opposite of the word \"{x}\"?",
                      "Give the opposite of {x}.", "What is an antonym of {x}?")

#: Every VAL_EVERY-th fact of each family is held out for validation.
VAL_EVERY = 5


def _split(facts: tuple) -> tuple[list, list]:
    train = [f for i, f in enumerate(facts) if i % VAL_EVERY != VAL_EVERY - 1]
    val = [f for i, f in enumerate(facts) if i % VAL_EVERY == VAL_EVERY - 1]
    return train, val


def fact_prompts(split: str, n: int, seed: int) -> list[dict]:
    """``n`` prompts ``{content, answer, family}`` on the ``split`` ("train" or "val") facts.
    Training draws (fact, phrasing) pairs without repeats; validation asks each held-out fact
    once, in a phrasing chosen by ``seed``, alternating the two families."""
    rng = random.Random(f"{seed}-{split}")
    families = []
    for family, facts, phrasings in (("capital", CAPITALS, CAPITAL_PHRASINGS),
                                     ("opposite", OPPOSITES, OPPOSITE_PHRASINGS)):
        chosen = _split(facts)[split == "val"]
        if split == "val":
            pool = [(x, ans, rng.choice(phrasings)) for x, ans in chosen]
        else:
            pool = [(x, ans, p) for x, ans in chosen for p in phrasings]
        rng.shuffle(pool)
        families.append([{"content": p.format(x=x), "answer": ans, "family": family} for x, ans, p in pool])
    mixed = [row for pair in zip(*families) for row in pair]
    mixed += [row for fam in families for row in fam[min(map(len, families)):]]
    if n > len(mixed):
        raise ValueError(f"only {len(mixed)} {split} fact prompts exist, asked for {n}")
    return mixed[:n]


def _fold(text: str) -> str:
    """Lower case, accents removed, non-letters as spaces, padded: for whole-word search."""
    plain = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii").lower()
    return " " + " ".join(re.sub(r"[^a-z]+", " ", plain).split()) + " "


def is_correct(answer_text: str, accepted: str) -> bool:
    """Whether ``answer_text`` contains one of the ``|``-separated ``accepted`` answers as whole
    words (case, accents and punctuation ignored)."""
    text = _fold(answer_text)
    return any(_fold(a) in text for a in accepted.split("|") if a.strip())


def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float:
    """The checker as a reward function: 1.0 for a correct answer to a fact prompt, else 0.0."""
    del data_source, extra_info
    if not ground_truth or not isinstance(solution_str, str):
        return 0.0
    return float(is_correct(solution_str, str(ground_truth)))
