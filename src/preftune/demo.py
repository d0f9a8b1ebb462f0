"""An offline, controlled-preference data set for the demo (in the spirit of the DPO paper's
controlled-sentiment experiment).

Prompts are the project's own: a topic (``autumn``, ``city buses``, ...) inside a short request
(``Write one sentence about {topic}.``). Each pair holds two one-sentence answers built from the
same template, one filled with positive words and one with negative words; VADER, a sentiment
scorer that is no part of this project (``preftune.scorers``), scores the positive one higher
in every pair. After training, the demo samples completions of held-out prompts from the
policy and from the reference, scores them with VADER and reports the policy's win rate, both
mean scores and the KL between them (``preftune eval``, ``preftune.evalgen``).

Rows are TRL-style conversational messages, rendered later with the model's chat template::

    {"prompt": [{"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}]}

Held-out (eval) rows use topics that never occur in train rows, so eval prompts are unseen.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .io import iter_jsonl

JUDGE = (
    "VADER's compound sentiment score (Hutto & Gilbert 2014, the vaderSentiment package; -1 to "
    "1): the chosen answer of every pair scores higher than the rejected one."
)


def _vader():
    from .scorers import load_scorer

    return load_scorer("vader")


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
    rows, order, judge = [], [], _vader()
    for _ in range(n):
        if not order:  # every prompt once before any repeats (then new response pairs)
            order = list(prompts)
            rng.shuffle(order)
        prompt = order.pop()
        chosen, rejected = make_pair(topic_of[prompt], rng.choice(RESPONSES), rng)
        better, worse = judge([chosen, rejected])
        assert better > worse, (chosen, better, rejected, worse)
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


def summarize(run_dir: str | Path, n_examples: int = 3, n: int = 2) -> dict:
    """Held-out reward metrics, and ``preftune eval`` of the run: ``n`` sampled completions
    (up to 32 tokens) of each of its ``n_samples`` first held-out prompts from policy and
    reference, judged by VADER (eval.json and a section of the report). Small, as sampling a
    135M model on 2 CPU cores takes minutes; the effect it measures is large."""
    from .config import read_yaml
    from .evalgen import EvalConfig, evaluate_generations, resolve, write_json
    from .report import write_report

    run = Path(run_dir)
    rows = [r for _, r in iter_jsonl(run / "metrics.jsonl", lenient=True)]
    evals = [r for r in rows if r["split"] == "eval"]
    saved = read_yaml(run / "config.yaml")
    cfg = resolve(EvalConfig(run=str(run), scorer="vader", n=n,
                             prompts=max(1, saved.get("n_samples") or 1),
                             max_new_tokens=min(32, saved["max_new_tokens"]), batch_size=32,
                             seed=saved["seed"]))
    result = evaluate_generations(cfg)
    write_json(run / "eval.json", result)
    write_report(run)
    keys = ("loss", "rewards/accuracies", "rewards/margins")
    summary = {
        "judge": JUDGE,
        "eval_first": {k: evals[0][k] for k in keys},
        "eval_last": {k: evals[-1][k] for k in keys},
        **{k: result[k] for k in ("prompts", "n", "win_rate", "score", "kl", "length")},
        "examples": [{"prompt": s["prompt"], "reference": s["reference"][0],
                      "policy": s["policy"][0]} for s in result["samples"][:n_examples]],
    }
    (run / "demo_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def print_summary(summary: dict) -> None:
    from .evalgen import summary_lines

    first, last = summary["eval_first"], summary["eval_last"]
    print(f"\nheld-out pairs: reward accuracy {first['rewards/accuracies']:.2f} -> "
          f"{last['rewards/accuracies']:.2f}, margin {first['rewards/margins']:.3f} -> "
          f"{last['rewards/margins']:.3f}")
    print(f"judge: {summary['judge']}")
    print("sampled completions of held-out prompts, policy against reference:")
    for line in summary_lines({**summary, "scorer": "vader"}):
        print(f"  {line}")
    for ex in summary["examples"]:
        prompt = ex["prompt"] if isinstance(ex["prompt"], str) else ex["prompt"][-1]["content"]
        print(f"\nprompt:    {prompt.strip()[-120:]!r}")
        for side in ("reference", "policy"):
            print(f"{side + ':':<10} {ex[side]['text'].strip()!r}  [{ex[side]['score']:+.2f}]")


def demo_args(argv: list[str], seed: int = 0) -> list[str]:
    """Generate the demo data (once; the files are reproducible) and return the arguments of
    the `preftune dpo` run: the recipe, the data files, then the user's overrides."""
    from datetime import datetime

    from .models import cache_dir

    data = generate(cache_dir() / "demo-data" / f"seed-{seed}", n_train=192, n_eval=64,
                    seed=seed)
    return [str(RECIPE), f"dataset={data['train']}", f"eval_dataset={data['eval']}",
            f"output_dir=runs/demo-{datetime.now():%Y%m%d-%H%M%S}", *argv]
