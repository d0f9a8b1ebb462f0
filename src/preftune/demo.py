"""An offline, controlled-preference data set for the demo (in the spirit of the DPO paper's
controlled-sentiment experiment).

Prompts are the project's own: a topic (``autumn``, ``city buses``, ...) inside a short request
(``Write one sentence about {topic}.``). Each pair holds two one-sentence answers built from the
same template, one filled with positive words and one with negative words, and the rule below
says which is better. Because the rule is a simple function of the text, a run can score the
policy's own completions with :func:`rule_score` and compare them with the reference's.

Rows are TRL-style conversational messages, rendered later with the model's chat template::

    {"prompt": [{"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}]}

Held-out (eval) rows use topics that never occur in train rows, so eval prompts are unseen.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from .io import iter_jsonl

RULE = (
    "A response is better when it is more positive: rule_score counts the positive minus the "
    "negative words from a fixed lexicon, as (pos - neg) / (pos + neg + 1)."
)

POSITIVE_WORDS = frozenset((
    "adore", "adorable", "amazing", "appreciate", "awesome", "beautiful", "best", "brilliant",
    "calm", "charming", "cheerful", "cherish", "comfort", "comforting", "cozy", "delight",
    "delighted", "delightful", "elegant", "enjoy", "enjoyable", "excellent", "exciting",
    "fabulous", "fantastic", "favorite", "fun", "glad", "gorgeous", "grateful", "great",
    "happiness", "happy", "hope", "hopeful", "inspiring", "joy", "joyful", "love", "lovely",
    "magical", "marvelous", "nice", "peace", "peaceful", "perfect", "pleasant", "pleasure",
    "refreshing", "relaxing", "remarkable", "satisfying", "smile", "splendid", "superb", "sweet",
    "terrific", "thrilling", "welcoming", "wonderful",
))  # fmt: skip
NEGATIVE_WORDS = frozenset((
    "angry", "annoying", "anxious", "awful", "bad", "bitter", "bland", "boring", "depressing",
    "despise", "disappointing", "disgust", "disgusting", "dislike", "dismal", "dread", "dreadful",
    "dull", "exhausting", "fear", "frustrating", "frustration", "gloomy", "grim", "gross", "hate",
    "hateful", "horrible", "hostile", "irritating", "lousy", "mediocre", "miserable", "misery",
    "nasty", "painful", "pathetic", "pointless", "sad", "sadness", "tedious", "terrible",
    "tiresome", "tired", "ugly", "unbearable", "unpleasant", "upset", "upsetting", "useless",
    "worst", "worthless", "wretched",
))  # fmt: skip
NEGATORS = frozenset((
    "not", "no", "never", "nothing", "hardly", "isn't", "aren't", "wasn't", "don't", "doesn't",
    "can't",
))  # fmt: skip
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def rule_score(text: str) -> float:
    """The rule's score of one completion, in (-1, 1); higher is better.

    Lower-cased words are matched against :data:`POSITIVE_WORDS` and :data:`NEGATIVE_WORDS`;
    a lexicon word right after a negator (``not``, ``never``, ``don't``, ...; one word may sit
    between) counts with the opposite sign. With ``pos`` and ``neg`` the two counts the score is
    ``(pos - neg) / (pos + neg + 1)``: 0 for neutral text, 0.5 for one positive word, 0.75 for
    three, and repeating words gains less and less. Deterministic; no model involved.
    """
    words = _WORD.findall(text.lower())
    pos = neg = 0
    for i, word in enumerate(words):
        sign = 1 if word in POSITIVE_WORDS else -1 if word in NEGATIVE_WORDS else 0
        if sign and NEGATORS.intersection(words[max(0, i - 2) : i]):
            sign = -sign
        pos += sign > 0
        neg += sign < 0
    return (pos - neg) / (pos + neg + 1)


TOPICS = (
    "autumn", "winter mornings", "summer rain", "the ocean", "mountain hikes", "city buses",
    "train journeys", "airports", "coffee", "green tea", "homemade bread", "spicy food",
    "vegetable soup", "chocolate cake", "breakfast", "picnics", "camping", "gardening",
    "houseplants", "cats", "dogs", "parrots", "goldfish", "horses", "bicycles", "electric cars",
    "motorcycles", "sailing", "swimming", "running", "yoga", "chess", "board games",
    "video games", "crossword puzzles", "jazz", "classical music", "rock concerts", "karaoke",
    "podcasts", "audiobooks", "libraries", "poetry", "science fiction", "history books",
    "comic books", "museums", "art galleries", "street markets", "shopping malls", "bakeries",
    "food trucks", "small towns", "big cities", "the countryside", "old castles", "bridges",
    "lighthouses", "rainy days", "snowstorms", "thunderstorms", "sunsets", "full moons",
    "the night sky", "fireworks", "birthdays", "weddings", "family dinners", "holidays",
    "road trips", "hotel rooms", "cruise ships", "theme parks", "zoos", "aquariums", "beaches",
    "forests", "deserts", "rivers", "lakes", "islands", "waterfalls", "caves", "volcanoes",
    "the moon landing", "space travel", "robots", "smartphones", "laptops", "social media",
    "email", "online meetings", "remote work", "open offices", "commuting", "Monday mornings",
    "weekends", "public parks", "playgrounds", "school lunches", "homework", "exams",
    "university lectures", "learning languages", "learning to cook", "learning to drive",
    "piano lessons", "painting", "photography", "knitting", "pottery", "woodworking",
    "baking cookies", "cleaning the house", "doing laundry", "grocery shopping",
    "moving house", "neighbors", "roommates", "team sports", "football", "basketball",
    "tennis", "golf", "ice skating", "skiing", "surfing", "fishing", "bird watching",
    "stargazing", "old movies", "cartoons", "reality shows", "documentaries", "musicals",
    "ballet", "opera", "stand-up comedy", "magic shows", "circuses", "street food",
    "pizza", "sushi", "tacos", "ice cream", "lemonade", "farmers", "firefighters", "teachers",
    "nurses", "postal workers", "bus drivers", "scientists", "inventors",
)  # fmt: skip

REQUESTS = (
    "Write one sentence about {t}.",
    "Describe {t} in one sentence.",
    "What do you think of {t}?",
    "Share a short opinion on {t}.",
    "Tell me how you feel about {t}.",
    "Give me one sentence on {t}.",
    "In a sentence, how is {t}?",
    "Say something about {t}.",
    "How would you describe {t}?",
    "Write a one-line review of {t}.",
    "What is your view on {t}?",
    "Comment briefly on {t}.",
)

# Slots filled from the positive or the negative side: {a}/{b} adjectives, {n} a feeling noun,
# {v} a verb of liking, {f} a feeling adjective. {T} is the topic with a capital first letter;
# {is}, {they} and {them} agree with it (is/it/it or are/they/them).
RESPONSES = (
    "{T} {is} {a} and always a source of {n}.",
    "I {v} {t}; {they} {is} truly {a}.",
    "Honestly, {t} {is} {a}, and I feel {f} about {them}.",
    "There is something {a} about {t} that brings {n}.",
    "In my opinion, {t} {is} {a} and {b}.",
    "{T} {is} {a}, and I {v} every moment of {them}.",
    "People who try {t} usually find {them} {a}.",
    "My experience with {t} has been {a} and full of {n}.",
    "{T} {is} truly {a}, and I {v} {them}.",
    "Whenever I think of {t}, I feel {f}.",
    "To me, {t} {is} {a}, and {b} too.",
    "I find {t} {a}; thinking of {them} makes me {f}.",
)
SLOTS = {
    "a": (
        "wonderful delightful lovely beautiful fantastic excellent charming inspiring amazing "
        "great pleasant brilliant",
        "awful dreadful horrible terrible miserable boring ugly depressing disappointing "
        "annoying unpleasant dull",
    ),
    "n": (
        "joy delight happiness hope comfort peace",
        "dread misery sadness frustration disgust fear",
    ),
    "v": ("love enjoy adore cherish appreciate", "hate dislike despise dread"),
    "f": ("happy cheerful calm grateful hopeful glad", "sad anxious angry tired gloomy upset"),
}
_SLOT_WORDS = {key: (pos.split(), neg.split()) for key, (pos, neg) in SLOTS.items()}

EVAL_TOPIC_FRACTION = 0.2


def split_topics(seed: int = 0) -> tuple[list[str], list[str]]:
    """(train topics, eval topics): a seeded shuffle, the last fifth held out."""
    topics = list(TOPICS)
    random.Random(f"preftune-demo-topics-{seed}").shuffle(topics)
    n_eval = round(len(topics) * EVAL_TOPIC_FRACTION)
    return sorted(topics[n_eval:]), sorted(topics[:n_eval])


# Topics are plural when they end in "s", except these.
SINGULAR_TOPICS = frozenset(("chess", "learning languages", "baking cookies"))


def _agreement(topic: str) -> dict[str, str]:
    if topic.endswith("s") and topic not in SINGULAR_TOPICS:
        return {"is": "are", "they": "they", "them": "them"}
    return {"is": "is", "they": "it", "them": "it"}


def make_pair(topic: str, template: str, rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected): one template filled with positive words, then with negative words."""
    fills = {}
    for side in (0, 1):
        values = {"t": topic, "T": topic[0].upper() + topic[1:], **_agreement(topic)}
        for key, words in _SLOT_WORDS.items():
            first, second = rng.sample(words[side], 2)
            values[key] = first
            if key == "a":
                values["b"] = second
        fills[side] = template.format(**values)
    return fills[0], fills[1]


def _rows(topics: list[str], n: int, rng: random.Random) -> list[dict]:
    prompts = [request.format(t=topic) for topic in topics for request in REQUESTS]
    topic_of = {request.format(t=topic): topic for topic in topics for request in REQUESTS}
    rows, order = [], []
    for _ in range(n):
        if not order:  # every prompt once before any repeats (then new response pairs)
            order = list(prompts)
            rng.shuffle(order)
        prompt = order.pop()
        chosen, rejected = make_pair(topic_of[prompt], rng.choice(RESPONSES), rng)
        assert rule_score(chosen) > rule_score(rejected), (chosen, rejected)
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


def generate(
    out_dir: str | Path, *, n_train: int = 1000, n_eval: int = 200, seed: int = 0
) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` into ``out_dir``; return their paths by split.

    The same arguments give byte-identical files. Eval prompts are about held-out topics, so
    no eval prompt occurs in train. Prompts are used once each before any repeats (with new
    response pairs); with seed 0 there are 1,476 train prompts and 372 eval prompts.
    """
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be >= 1, got {n_train} and {n_eval}")
    train_topics, eval_topics = split_topics(seed)
    rng = random.Random(seed)
    splits = {"train": _rows(train_topics, n_train, rng), "eval": _rows(eval_topics, n_eval, rng)}
    train_prompts = {row["prompt"][0]["content"] for row in splits["train"]}
    assert not train_prompts & {row["prompt"][0]["content"] for row in splits["eval"]}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in splits.items():
        path = out / f"{split}.jsonl"
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        path.write_text(text, encoding="utf-8", newline="\n")
        paths[split] = path
    return paths


# ---------------------------------------------------------------------------------------------
# the demo job: generate the data, run `preftune dpo` on the recipe, score the samples


RECIPE = Path(__file__).parent / "recipes" / "demo.yaml"


def summarize(run_dir: str | Path, n_examples: int = 3) -> dict:
    """Held-out reward metrics and the rule's score of policy vs reference completions."""
    run = Path(run_dir)
    rows = [r for _, r in iter_jsonl(run / "metrics.jsonl", lenient=True)]
    evals = [r for r in rows if r["split"] == "eval"]
    samples = [r for _, r in iter_jsonl(run / "samples.jsonl", lenient=True)]
    last_step = max(s["step"] for s in samples)
    final = [s for s in samples if s["step"] == last_step]
    policy = [rule_score(s["policy"]) for s in final]
    reference = [rule_score(s["reference"]) for s in final]
    summary = {
        "rule": RULE,
        "eval_first": {k: evals[0][k] for k in ("loss", "rewards/accuracies", "rewards/margins")},
        "eval_last": {k: evals[-1][k] for k in ("loss", "rewards/accuracies", "rewards/margins")},
        "prompts": len(final),
        "rule_score_policy": sum(policy) / len(policy),
        "rule_score_reference": sum(reference) / len(reference),
        "policy_better": sum(p > r for p, r in zip(policy, reference, strict=True)),
        "policy_worse": sum(p < r for p, r in zip(policy, reference, strict=True)),
        "examples": final[:n_examples],
    }
    (run / "demo_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def print_summary(summary: dict) -> None:
    first, last = summary["eval_first"], summary["eval_last"]
    print(f"\nheld-out pairs: reward accuracy {first['rewards/accuracies']:.2f} -> "
          f"{last['rewards/accuracies']:.2f}, margin {first['rewards/margins']:.3f} -> "
          f"{last['rewards/margins']:.3f}")
    print(f"rule ({summary['rule']})")
    print(f"rule score on {summary['prompts']} held-out prompts: policy "
          f"{summary['rule_score_policy']:+.3f} vs reference {summary['rule_score_reference']:+.3f}"
          f" (policy better on {summary['policy_better']}, worse on {summary['policy_worse']})")
    for ex in summary["examples"]:
        print(f"\nprompt:    {ex['prompt'].strip()[-120:]!r}")
        print(f"reference: {ex['reference'].strip()!r}  [{rule_score(ex['reference']):+.2f}]")
        print(f"policy:    {ex['policy'].strip()!r}  [{rule_score(ex['policy']):+.2f}]")


def demo_args(argv: list[str], seed: int = 0) -> list[str]:
    """Generate the demo data (once; the files are reproducible) and return the arguments of
    the `preftune dpo` run: the recipe, the data files, then the user's overrides."""
    from datetime import datetime

    from .models import cache_dir

    data = generate(cache_dir() / "demo-data" / f"seed-{seed}", n_train=192, n_eval=64,
                    seed=seed)
    return [str(RECIPE), f"dataset={data['train']}", f"eval_dataset={data['eval']}",
            f"output_dir=runs/demo-{datetime.now():%Y%m%d-%H%M%S}", *argv]
