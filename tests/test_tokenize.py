"""tokenize_pair / tokenize_sft / render_chat: DPO truncation, BOS/EOS, chat templates."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from preftune.data import (
    DataError,
    PreferencePair,
    default_truncation,
    load_pairs,
    read_pairs,
    render_chat,
    tokenize_pair,
    tokenize_sft,
)

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
TOKENIZERS = ASSETS / "tokenizers"
DATA = ASSETS / "data"

PAD, BOS, EOS = 0, 1, 2
OFFSET = 4  # id of word "w<i>" is i + OFFSET


def word_tokenizer(bos: bool = True, eos: bool = True, chat_template: str | None = None):
    """One token per whitespace-separated word: lengths in tests are exact by construction."""
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3}
    vocab |= {f"w{i}": i + OFFSET for i in range(200)}
    vocab |= {w: 300 + i for i, w in enumerate(["user", "assistant", "system", "|"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:  # the tokenizer's normal encoding starts with BOS, like Llama's
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", BOS)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>" if eos else None,
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def words(start: int, stop: int) -> str:
    return " ".join(f"w{i}" for i in range(start, stop))


def ids(start: int, stop: int) -> list[int]:
    return [i + OFFSET for i in range(start, stop)]


def text_pair(prompt: str, chosen: str, rejected: str, fmt: str = "explicit") -> PreferencePair:
    return PreferencePair(prompt, chosen, rejected, "test.jsonl:1", fmt)


@pytest.fixture(scope="module")
def gpt2():
    return AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")


@pytest.fixture(scope="module")
def qwen():
    return AutoTokenizer.from_pretrained(TOKENIZERS / "qwen2.5")


@pytest.fixture(scope="module")
def phi3():
    return AutoTokenizer.from_pretrained(TOKENIZERS / "phi-3-mini")


# --- exact truncation arithmetic ----------------------------------------------------------------


def test_fits_no_truncation_with_bos() -> None:
    tok = word_tokenizer(bos=True)
    out = tokenize_pair(
        text_pair(words(0, 5), words(10, 13), words(20, 24)),
        tok,
        max_length=20,
        max_prompt_length=10,
    )
    prompt = [BOS, *ids(0, 5)]
    assert out == {
        "prompt_input_ids": prompt,
        "chosen_input_ids": prompt + ids(10, 13) + [EOS],
        "chosen_labels": [-100] * 6 + ids(10, 13) + [EOS],
        "rejected_input_ids": prompt + ids(20, 24) + [EOS],
        "rejected_labels": [-100] * 6 + ids(20, 24) + [EOS],
    }


@pytest.mark.parametrize(
    ("bos", "truncation", "expected_prompt"),
    [
        (False, "keep_end", ids(14, 30)),
        (False, "keep_start", ids(0, 16)),
        # BOS counts toward the 16 prompt tokens and stays first.
        (True, "keep_end", [BOS, *ids(15, 30)]),
        (True, "keep_start", [BOS, *ids(0, 15)]),
    ],
)
def test_prompt_truncation(bos: bool, truncation: str, expected_prompt: list[int]) -> None:
    pair = text_pair(words(0, 30), words(100, 105), words(110, 118))
    out = tokenize_pair(
        pair, word_tokenizer(bos=bos), max_length=32, max_prompt_length=16, truncation=truncation
    )
    assert out["prompt_input_ids"] == expected_prompt
    # 16 + 9 <= 32: the responses are untouched and keep their EOS.
    assert out["chosen_input_ids"] == expected_prompt + ids(100, 105) + [EOS]
    assert out["rejected_input_ids"] == expected_prompt + ids(110, 118) + [EOS]


def test_response_truncation_keeps_start_and_drops_eos() -> None:
    tok = word_tokenizer(bos=False)
    pair = text_pair(words(0, 10), words(100, 140), words(150, 153))
    out = tokenize_pair(pair, tok, max_length=32, max_prompt_length=16)
    # The prompt (10 <= 16) is kept; the responses are cut to 32 - 16 = 16 tokens.
    assert out["prompt_input_ids"] == ids(0, 10)
    assert out["chosen_input_ids"] == ids(0, 10) + ids(100, 116)
    assert out["chosen_labels"] == [-100] * 10 + ids(100, 116)
    assert out["rejected_input_ids"] == ids(0, 10) + ids(150, 153) + [EOS]
    assert len(out["chosen_input_ids"]) == 26


def test_prompt_and_response_truncation_reach_max_length() -> None:
    tok = word_tokenizer(bos=True)
    pair = text_pair(words(0, 30), words(100, 140), words(150, 190), fmt="hh")
    out = tokenize_pair(pair, tok, max_length=32, max_prompt_length=16)  # hh: keep_end
    assert out["prompt_input_ids"] == [BOS, *ids(15, 30)]
    assert out["chosen_input_ids"][16:] == ids(100, 116)
    assert out["rejected_input_ids"][16:] == ids(150, 166)
    assert len(out["chosen_input_ids"]) == len(out["rejected_input_ids"]) == 32


def test_default_truncation_follows_format() -> None:
    assert default_truncation("hh") == default_truncation("conversational") == "keep_end"
    for fmt in ("shp", "stack-exchange-paired", "explicit", "implicit"):
        assert default_truncation(fmt) == "keep_start"
    tok = word_tokenizer(bos=False)
    for fmt, expected in (("hh", ids(14, 30)), ("shp", ids(0, 16))):
        pair = text_pair(words(0, 30), words(100, 105), words(110, 118), fmt=fmt)
        out = tokenize_pair(pair, tok, max_length=32, max_prompt_length=16)
        assert out["prompt_input_ids"] == expected


def test_length_validation_and_missing_eos() -> None:
    pair = text_pair("w1", "w2", "w3")
    tok = word_tokenizer()
    for max_length, max_prompt_length in ((16, 16), (16, 32), (16, -1)):
        with pytest.raises(ValueError, match="need 0 <= max_prompt_length < max_length"):
            tokenize_pair(pair, tok, max_length=max_length, max_prompt_length=max_prompt_length)
    with pytest.raises(ValueError, match="unknown truncation 'middle'"):
        tokenize_pair(pair, tok, truncation="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokenizer has no eos_token_id"):
        tokenize_pair(pair, word_tokenizer(eos=False))


def test_tokenize_sft_matches_chosen_side() -> None:
    tok = word_tokenizer(bos=True)
    pair = text_pair(words(0, 30), words(100, 140), words(150, 153))
    sft = tokenize_sft(pair, tok, max_length=32, max_prompt_length=16)
    dpo = tokenize_pair(pair, tok, max_length=32, max_prompt_length=16)
    assert sft == {"input_ids": dpo["chosen_input_ids"], "labels": dpo["chosen_labels"]}
    # Only the chosen response counts for SFT: a long rejected one cuts nothing here.
    pair = text_pair(words(0, 10), words(100, 105), words(110, 190))
    assert tokenize_sft(pair, tok, max_length=32, max_prompt_length=16) == {
        "input_ids": [BOS, *ids(0, 10), *ids(100, 105), EOS],
        "labels": [-100] * 11 + ids(100, 105) + [EOS],
    }


# --- BOS choices ----------------------------------------------------------------------------


def test_no_bos_for_gpt2_style(gpt2) -> None:
    pair = text_pair("\n\nHuman: Hi\n\nAssistant:", " Hello", " Bye")
    out = tokenize_pair(pair, gpt2)
    assert gpt2.bos_token_id == gpt2.eos_token_id
    assert out["prompt_input_ids"] == gpt2.encode(pair.prompt, add_special_tokens=False)
    assert out["chosen_input_ids"].count(gpt2.eos_token_id) == 1


def test_bos_only_when_the_tokenizer_adds_it(phi3) -> None:
    pair = text_pair("Hi there.", " Hello", " Bye")
    # This Phi-3 config has add_bos_token false: its encodings carry no BOS, so neither do ours.
    assert tokenize_pair(pair, phi3)["prompt_input_ids"][0] != phi3.bos_token_id
    with_bos = AutoTokenizer.from_pretrained(TOKENIZERS / "phi-3-mini", add_bos_token=True)
    out = tokenize_pair(pair, with_bos)
    assert out["prompt_input_ids"] == [with_bos.bos_token_id] + with_bos.encode(
        pair.prompt, add_special_tokens=False
    )
    assert out["chosen_input_ids"].count(with_bos.bos_token_id) == 1


TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} | {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


def conv_pair(source: str = "chat.jsonl:7") -> PreferencePair:
    return PreferencePair(
        [{"role": "user", "content": words(0, 3)}],
        [{"role": "assistant", "content": words(10, 12)}],
        [{"role": "assistant", "content": words(20, 23)}],
        source,
        "conversational",
    )


def test_chat_template_rendering_bos_in_template_not_doubled() -> None:
    tok = word_tokenizer(bos=True, chat_template="{{ bos_token }} " + TEMPLATE)
    prompt_text, chosen_text, _ = render_chat(conv_pair(), tok)
    assert prompt_text == "<s> user w0 w1 w2 | assistant "
    assert chosen_text == "w10 w11 | "
    out = tokenize_pair(conv_pair(), tok)
    user, assistant, bar = 300, 301, 303
    assert out["prompt_input_ids"] == [BOS, user, *ids(0, 3), bar, assistant]
    assert out["chosen_input_ids"] == out["prompt_input_ids"] + [*ids(10, 12), bar, EOS]


def test_chat_template_without_bos_gets_one_when_tokenizer_adds_it() -> None:
    out = tokenize_pair(conv_pair(), word_tokenizer(bos=True, chat_template=TEMPLATE))
    assert out["prompt_input_ids"][:2] == [BOS, 300]
    out = tokenize_pair(conv_pair(), word_tokenizer(bos=False, chat_template=TEMPLATE))
    assert out["prompt_input_ids"][0] == 300


def test_chat_template_eos_not_doubled() -> None:
    tok = word_tokenizer(bos=False, chat_template=TEMPLATE.replace(" | ", " </s> \n"))
    out = tokenize_pair(conv_pair(), tok)
    response = out["chosen_labels"][len(out["prompt_input_ids"]) :]
    assert response == [*ids(10, 12), EOS]  # the template's EOS, no second one


def test_chat_template_not_a_prefix() -> None:
    tok = word_tokenizer(chat_template="{{ messages | length }} " + TEMPLATE)
    with pytest.raises(DataError) as err:
        tokenize_pair(conv_pair(), tok)
    msg = str(err.value)
    assert msg.startswith("chat.jsonl:7: the chat template does not render the prompt as a prefix")
    assert "prompt+chosen" in msg and "\n" not in msg


def test_no_chat_template(gpt2) -> None:
    with pytest.raises(
        DataError, match=r"^chat\.jsonl:7: conversational pair needs a chat template"
    ):
        tokenize_pair(conv_pair(), gpt2)


def test_render_chat_text_pair_unchanged(gpt2) -> None:
    pair = text_pair("P", " a", " b")
    assert render_chat(pair, gpt2) == ("P", " a", " b")


# --- real data --------------------------------------------------------------------------------

# Verified with an independent script (raw JSON + GPT-2 encode): pairs whose prompt is cut
# to 256 tokens, and pairs with at least one response cut to 256, at 512/256.
HH_TRUNCATED = {"helpful-base": (91, 13), "harmless-base": (74, 14)}


@pytest.mark.parametrize("split", sorted(HH_TRUNCATED))
def test_hh_every_row_gpt2(split: str, gpt2) -> None:
    eos = gpt2.eos_token_id
    cut_prompts = cut_responses = 0
    pairs = list(read_pairs(DATA / "hh-rlhf" / split / "test.jsonl.gz", quiet=True))
    for pair in pairs:
        out = tokenize_pair(pair, gpt2, max_length=512, max_prompt_length=256)
        prompt = out["prompt_input_ids"]
        n = len(prompt)
        full_prompt = gpt2.encode(pair.prompt, add_special_tokens=False)
        assert full_prompt[len(full_prompt) - n :] == prompt  # keep_end for hh
        cut_prompts += n < len(full_prompt)
        cut = False
        for side in ("chosen", "rejected"):
            input_ids, labels = out[f"{side}_input_ids"], out[f"{side}_labels"]
            assert input_ids[:n] == prompt
            assert labels[:n] == [-100] * n and -100 not in labels[n:]
            assert labels[n:] == input_ids[n:]
            assert len(input_ids) <= 512
            response = gpt2.encode(getattr(pair, side), add_special_tokens=False) + [eos]
            if labels[n:] == response:
                assert labels[-1] == eos
            else:  # cut to max_length - max_prompt_length, keeping its start
                assert labels[n:] == response[:256]
                cut = True
        cut_responses += cut
    assert (cut_prompts, cut_responses) == HH_TRUNCATED[split]


def test_stack_exchange_sample_gpt2(gpt2) -> None:
    pairs, _ = load_pairs(DATA / "stack-exchange-paired" / "tiny.json")
    cut = 0
    for pair in pairs:
        out = tokenize_pair(pair, gpt2)
        prompt = out["prompt_input_ids"]
        full = gpt2.encode(pair.prompt, add_special_tokens=False)
        assert full[: len(prompt)] == prompt  # keep_start
        cut += len(prompt) < len(full)
        assert max(len(out["chosen_input_ids"]), len(out["rejected_input_ids"])) <= 512
        assert gpt2.decode(prompt).startswith("\n\nHuman: ")
    assert cut == 21


@pytest.fixture(scope="module")
def demo_pairs() -> list[PreferencePair]:
    return load_pairs(DATA / "llamafactory" / "dpo_en_demo.json")[0]


def test_sharegpt_demo_qwen(demo_pairs, qwen) -> None:
    im_end, newline = qwen.convert_tokens_to_ids(["<|im_end|>", "Ċ"])
    assert qwen.eos_token_id == im_end
    for pair in demo_pairs:
        out = tokenize_pair(pair, qwen, max_length=8192, max_prompt_length=4096)
        prompt = out["prompt_input_ids"]
        assert qwen.decode(prompt) == qwen.apply_chat_template(
            pair.prompt, tokenize=False, add_generation_prompt=True
        )
        for side in ("chosen", "rejected"):
            full = qwen.apply_chat_template(pair.prompt + getattr(pair, side), tokenize=False)
            input_ids, labels = out[f"{side}_input_ids"], out[f"{side}_labels"]
            assert qwen.decode(input_ids) == full
            assert labels[: len(prompt)] == [-100] * len(prompt)
            # The template's "<|im_end|>\n" ends the response; no extra EOS.
            assert labels[-2:] == [im_end, newline] and labels[-3] != im_end
        short = tokenize_pair(pair, qwen)
        assert len(short["chosen_input_ids"]) <= 512 and len(short["rejected_input_ids"]) <= 512


def test_sharegpt_demo_phi3(demo_pairs, phi3) -> None:
    eos = phi3.eos_token_id
    for pair in demo_pairs:
        out = tokenize_pair(pair, phi3, max_length=8192, max_prompt_length=4096)
        for side in ("chosen", "rejected"):
            full = phi3.apply_chat_template(pair.prompt + getattr(pair, side), tokenize=False)
            assert full.endswith("<|end|>\n<|endoftext|>")
            # Phi-3 drops "\n" after its special tokens, so the text does not round-trip; the
            # ids are exactly those of the whole rendering (no stray "▁" at the response start).
            expected = phi3(full, add_special_tokens=False, verbose=False)["input_ids"]
            assert out[f"{side}_input_ids"] == expected
            assert phi3.decode(out[f"{side}_input_ids"]) == phi3.decode(expected)
            assert out[f"{side}_labels"][-1] == eos and out[f"{side}_labels"][-2] != eos


# --- long rows: only what truncation can keep is tokenized ----------------------------------------


@pytest.fixture()
def seen_chars(monkeypatch):
    """The length of every text handed to the tokenizer (the real one still runs)."""
    from preftune.data import tokenize

    seen: list[int] = []
    encode = tokenize._encode

    def spy(tokenizer, text):
        seen.append(len(text))
        return encode(tokenizer, text)

    monkeypatch.setattr(tokenize, "_encode", spy)
    return seen


def _uncapped(monkeypatch, fn, *args, **kwargs):
    from preftune.data import tokenize

    with monkeypatch.context() as m:
        m.setattr(tokenize, "CHARS_PER_TOKEN", 10**12)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("truncation", ["keep_start", "keep_end"])
def test_long_text_row_tokenizes_a_bounded_prefix_with_the_same_result(
        gpt2, seen_chars, monkeypatch, truncation):
    """A 50 MB row cost 6.7 GB; a 400 KB one stands in for it here."""
    long = "The quick brown fox jumps over the lazy dog, again and again. " * 6_500
    pair = text_pair(long, " yes" + long, " no", fmt="explicit")
    got = tokenize_pair(pair, gpt2, max_length=64, max_prompt_length=32, truncation=truncation)
    assert max(seen_chars) <= 64 * 32 and len(long) > 400_000
    assert got == _uncapped(monkeypatch, tokenize_pair, pair, gpt2, max_length=64,
                            max_prompt_length=32, truncation=truncation)


def test_long_chat_row_tokenizes_a_bounded_part_with_the_same_result(qwen, seen_chars,
                                                                     monkeypatch):
    long = "Tell me about foxes and dogs, please, in detail. " * 8_000
    pair = PreferencePair([{"role": "user", "content": long}],
                          [{"role": "assistant", "content": "Sure. " + long}],
                          [{"role": "assistant", "content": "No."}], "t.jsonl:1",
                          "conversational")
    got = tokenize_pair(pair, qwen, max_length=64, max_prompt_length=32)
    assert max(seen_chars) <= 2 * 64 * 32
    assert got == _uncapped(monkeypatch, tokenize_pair, pair, qwen, max_length=64,
                            max_prompt_length=32)


def test_text_of_unusually_long_tokens_falls_back_to_the_whole_text(seen_chars):
    """One token per word and 100-character words: the cut part gives too few tokens."""
    tok = word_tokenizer(bos=False)
    prompt = " ".join(["w1" + "0" * 98] * 200)  # <unk> tokens, 101 chars each
    got = tokenize_pair(text_pair(prompt, "w1", "w2"), tok, max_length=8, max_prompt_length=4)
    assert got["prompt_input_ids"] == [3] * 4 and max(seen_chars) == len(prompt)
