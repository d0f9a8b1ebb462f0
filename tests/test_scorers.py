import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from preftune.config import ConfigError
from preftune.scorers import load_scorer

SENTENCES = ["VADER is smart, handsome, and funny.", "The book was kind of good.",
             "Today SUX!", "The bus leaves at noon.", "Not bad at all."]


def test_vader_gives_the_packages_compound_scores():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    scores = load_scorer("vader")(SENTENCES)
    assert scores == [analyzer.polarity_scores(s)["compound"] for s in SENTENCES]
    # the compound scores its README lists for the first three; plain fact is neutral
    assert scores[:4] == [0.8316, 0.3832, -0.5461, 0.0]
    assert scores[4] > 0  # negation flips "bad"
    assert load_scorer("vader")([]) == []


def _tiny_classifier(path, gpt2_tokenizer, num_labels):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(gpt2_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_labels=num_labels, pad_token_id=gpt2_tokenizer.eos_token_id)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return model


@pytest.mark.parametrize("num_labels", [1, 2])
def test_reward_model_batches_equal_single_texts(tmp_path, gpt2_tokenizer, num_labels):
    model = _tiny_classifier(tmp_path, gpt2_tokenizer, num_labels)
    texts = ["a short one", "a somewhat longer text than the first", "x", "fourth text here"]
    scores = load_scorer(f"reward_model:{tmp_path}", batch_size=3)(texts)
    with torch.no_grad():
        for text, score in zip(texts, scores, strict=True):
            logits = model(**gpt2_tokenizer(text, return_tensors="pt")).logits[0]
            want = logits[0] if num_labels == 1 else logits[1] - logits[0]
            assert score == pytest.approx(want.item(), abs=1e-5)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "def length(texts):\n    return [len(t) for t in texts]\n"
        "def short(texts):\n    return [1.0]\n"
        "def nan(texts):\n    return [float('nan')] * len(texts)\n"
        "def boom(texts):\n    raise RuntimeError('no model here')\n"
        "NOT_A_FUNCTION = 3\n")
    (tmp_path / "broken_scores.py").write_text("import no_such_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_python_scorer(user_module):
    assert load_scorer("python:my_scores:length")(["ab", "", "abcd"]) == [2.0, 0.0, 4.0]


@pytest.mark.parametrize("spec, message", [
    ("sentiment", "scorer: unknown scorer 'sentiment'; expected one of vader, "
                  "reward_model:PATH, python:MODULE:FUNCTION"),
    ("vader:x", "scorer: unknown scorer 'vader:x'"),
    ("reward_model:/no/such/folder", "scorer: reward_model:/no/such/folder: no such folder"),
    ("python:my_scores", "scorer: python:my_scores: expected python:MODULE:FUNCTION"),
    ("python:no_such_mod:f", "scorer: python:no_such_mod:f: cannot import 'no_such_mod' "
                             "(ModuleNotFoundError"),
    ("python:broken_scores:f", "cannot import 'broken_scores' (ModuleNotFoundError: No module "
                               "named 'no_such_module_anywhere')"),
    ("python:my_scores:missing", "module 'my_scores' has no function 'missing'"),
    ("python:my_scores:NOT_A_FUNCTION", "module 'my_scores' has no function 'NOT_A_FUNCTION'"),
])
def test_scorer_loading_errors(user_module, spec, message):
    with pytest.raises(ConfigError) as e:
        load_scorer(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name, message", [
    ("short", "scorer 'python:my_scores:short' returned 1 values for 2 texts"),
    ("nan", "scorer 'python:my_scores:nan' returned nan; expected finite floats"),
    ("boom", "scorer 'python:my_scores:boom' failed: RuntimeError: no model here"),
])
def test_broken_scorer_outputs(user_module, name, message):
    scorer = load_scorer(f"python:my_scores:{name}")
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        scorer(["a", "b"])


def test_reward_model_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ConfigError, match=f"scorer: reward_model:{tmp_path}: cannot load"):
        load_scorer(f"reward_model:{tmp_path}")
