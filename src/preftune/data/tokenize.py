"""Turn preference pairs into token ids with the semantics of the original DPO code.

As in eric-mitchell/direct-preference-optimization (``tokenize_batch_element``): prompt and
responses are tokenized separately without special tokens, EOS is appended to each response,
and when prompt + longer response exceeds ``max_length`` the prompt is cut to
``max_prompt_length`` tokens, then (if still too long) each response to
``max_length - max_prompt_length`` tokens, keeping its start. A cut response loses its EOS.

Choices made here:

* **BOS.** When the tokenizer has a BOS token distinct from EOS and its normal encoding
  (``add_special_tokens=True``) starts with it, the prompt gets exactly one BOS in front; it
  counts toward the prompt length and ``keep_end`` truncation keeps it in first position.
  GPT-2 style tokenizers (BOS == EOS) never get one. A chat rendering that already starts with
  the BOS text gets no second one.
* **Chat templates.** Conversational pairs are rendered with ``apply_chat_template``
  (:func:`render_chat`): the prompt with the generation prompt, the response is the rest of
  the rendering of prompt + response messages, kept verbatim (Qwen's ``"<|im_end|>\\n"``
  included). Response ids are the tail of the ids of the whole rendering after the prompt ids
  (falling back to separate tokenization when the prompt ids are not a prefix), so that
  SentencePiece tokenizers do not put a spurious word-start space at the response start.
* **EOS with chat templates.** If the rendered response already ends with the EOS token
  (ignoring trailing whitespace), no EOS is appended; otherwise one is, as for text pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from preftune.data.formats import DataError, Message, PreferencePair, RowSkip

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Truncation = Literal["keep_end", "keep_start"]

IGNORE_INDEX = -100  # label of a token the loss skips (PyTorch's cross-entropy default)
# A text of more than CHARS_PER_TOKEN * max_length characters is cut to that many, on the side
# truncation keeps, before it is tokenized (see _encode_kept): a 50 MB row costs what its kept
# part costs. Ordinary text has 3-5 characters per token, a long repeated run a few dozen.
CHARS_PER_TOKEN = 32
# How many tokens past max_length the cut part must still give for its tokens to be used.
_CUT_MARGIN = 16


def default_truncation(format: str) -> Truncation:
    """``keep_end`` for dialogues: HH (as the original DPO code) and chat messages, where the
    start of a too-long conversation goes and its last turns and generation prompt stay;
    ``keep_start`` otherwise (as the original code for other datasets)."""
    return "keep_end" if format in ("hh", "conversational") else "keep_start"


def resolve_truncation(setting: str | None, format: str) -> Truncation:
    """The mode a pair is cut with: ``setting``, or for ``None``/``"auto"`` its format's default."""
    mode = default_truncation(format) if setting in (None, "auto") else setting
    if mode not in ("keep_end", "keep_start"):
        raise ValueError(f"unknown truncation {mode!r}; use 'keep_end' or 'keep_start'")
    return mode  # type: ignore[return-value]


def bos_head(prompt: list[int], bos: int | None) -> int:
    """How many leading prompt tokens ``keep_end`` keeps in front (a leading BOS: the model
    has only ever seen it there), before the kept end."""
    return 1 if bos is not None and prompt[:1] == [bos] else 0


def _apply_template(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation: bool, source: str
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )
    except Exception as e:  # jinja errors (e.g. "roles must alternate") surface as many types
        raise DataError(f"{source}: the chat template failed on this pair ({e})") from None
    if not isinstance(text, str):
        raise DataError(f"{source}: apply_chat_template returned {type(text).__name__}, not text")
    return text


def chat_template_check(tokenizer: PreTrainedTokenizerBase) -> Callable[[PreferencePair], None]:
    """A ``check=`` for :func:`~preftune.data.load_pairs`: a conversational pair that the chat
    template rejects (or renders with a prompt that is not a prefix) is skipped and reported as
    a bad row, "chat template failed". A tokenizer with no template is left to render_chat's
    error at tokenization: that is a problem of the whole file, not of a row."""

    def check(pair: PreferencePair) -> None:
        if not pair.is_conversational or not getattr(tokenizer, "chat_template", None):
            return
        try:
            render_chat(pair, tokenizer)
        except DataError as e:
            raise RowSkip("chat template failed",
                          str(e).removeprefix(f"{pair.source}: ")) from None

    return check


def render_chat(pair: PreferencePair, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, str]:
    """Prompt text (with generation prompt), chosen text and rejected text (continuations).

    Text pairs are returned unchanged. Conversational pairs are rendered with the tokenizer's
    chat template; each response is the rendering of prompt + response messages minus the
    rendering of the prompt.
    """
    if not pair.is_conversational:
        return pair.prompt, pair.chosen, pair.rejected  # type: ignore[return-value]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{pair.source}: conversational pair needs a chat template, but the tokenizer "
            f"({type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '')!r}) has none; "
            "set tokenizer.chat_template or use a text format"
        )
    prompt_text = _apply_template(tokenizer, pair.prompt, True, pair.source)
    responses = []
    for name, messages in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        full = _apply_template(tokenizer, [*pair.prompt, *messages], False, pair.source)
        if not full.startswith(prompt_text):
            raise DataError(
                f"{pair.source}: the chat template does not render the prompt as a prefix of "
                f"prompt+{name} (prompt ends {prompt_text[-40:]!r}, full rendering has "
                f"{full[max(0, len(prompt_text) - 40) : len(prompt_text)]!r} there), so the "
                f"{name} response cannot be split off"
            )
        responses.append(full[len(prompt_text) :])
    return prompt_text, responses[0], responses[1]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # verbose=False: long texts are truncated here, not by the tokenizer, so its warning
    # about model_max_length is noise.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _encode_kept(
    tokenizer: PreTrainedTokenizerBase, text: str, max_length: int | None, keep_end: bool
) -> list[int]:
    """Token ids of ``text``; of a long one, only those of the part truncation keeps.

    A text of more than ``CHARS_PER_TOKEN * max_length`` characters is cut to that many at the
    end truncation keeps (the start, or the end for a ``keep_end`` prompt) and that part is
    tokenized. When it gives more than ``max_length + _CUT_MARGIN`` tokens, the whole text has
    more than max_length tokens too, so truncation cuts it in any case, and the at most
    max_length tokens it keeps lie at the kept end, at least _CUT_MARGIN tokens away from the
    cut: they are the tokens of the whole text. Otherwise (unusually long tokens) the whole
    text is tokenized. ``max_length=None``: no cut."""
    cap = None if max_length is None else CHARS_PER_TOKEN * max_length
    if cap is None or len(text) <= cap:
        return _encode(tokenizer, text)
    ids = _encode(tokenizer, text[-cap:] if keep_end else text[:cap])
    if len(ids) > max_length + _CUT_MARGIN:  # type: ignore[operator]
        return ids
    return _encode(tokenizer, text)


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "tokenizer has no eos_token_id; DPO appends EOS to every response, so set "
            "tokenizer.eos_token first"
        )
    return int(eos)


def _distinct_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    bos = tokenizer.bos_token_id
    if bos is None or bos == tokenizer.eos_token_id:
        return None
    return int(bos)


def _bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[BOS] when the tokenizer's own encoding would start with a distinct BOS, else []."""
    bos = _distinct_bos(tokenizer)
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if list(probe[:1]) == [bos] else []


def _tokenize_parts(
    pair: PreferencePair,
    tokenizer: PreTrainedTokenizerBase,
    names: tuple[str, ...],
    max_length: int | None = None,
    keep_end: bool = False,
) -> tuple[list[int], list[list[int]]]:
    """Prompt ids (BOS included) and response ids (EOS included) for the named responses.

    With ``max_length``, a text too long to survive truncation whole is tokenized only as far
    as truncation to max_length can keep (see _encode_kept); ``keep_end``: of the prompt, its
    end. Without, every text is tokenized whole."""
    eos = _eos_id(tokenizer)
    if not pair.is_conversational:
        prompt = _bos_prefix(tokenizer) + _encode_kept(
            tokenizer, pair.prompt, max_length, keep_end)  # type: ignore[arg-type]
        return prompt, [_encode_kept(tokenizer, getattr(pair, n), max_length, False) + [eos]
                        for n in names]

    prompt_text, chosen_text, rejected_text = render_chat(pair, tokenizer)
    texts = {"chosen": chosen_text, "rejected": rejected_text}
    prompt_body = _encode_kept(tokenizer, prompt_text, max_length, keep_end)
    bos_text = tokenizer.bos_token if _distinct_bos(tokenizer) is not None else None
    starts_with_bos = bool(bos_text) and prompt_text.startswith(bos_text)
    prompt = prompt_body if starts_with_bos else _bos_prefix(tokenizer) + prompt_body
    eos_text = tokenizer.eos_token
    responses = []
    for name in names:
        text = texts[name]
        ids = _chat_response(tokenizer, prompt_text, prompt_body, text, max_length)
        if not (eos_text and text.rstrip().endswith(eos_text)):
            ids.append(eos)
        responses.append(ids)
    return prompt, responses


def _chat_response(
    tokenizer: PreTrainedTokenizerBase, prompt_text: str, prompt_body: list[int], text: str,
    max_length: int | None,
) -> list[int]:
    """The ids of a rendered response: the tail of the ids of prompt + response after the
    prompt's ids (or, when the tokenizer merged across the boundary, the response alone).

    Of a long prompt only its last ``CHARS_PER_TOKEN * max_length`` characters are the context
    (tokens are merged only across a short distance), and a long response is cut as in
    _encode_kept; ordinary rows are tokenized whole, as without max_length."""
    cap = None if max_length is None else CHARS_PER_TOKEN * max_length
    context, context_ids = prompt_text, prompt_body
    if cap is not None and len(prompt_text) > cap:
        context = prompt_text[-cap:]
        context_ids = _encode(tokenizer, context)
    cut = cap is not None and len(text) > cap
    full = _encode(tokenizer, context + (text[:cap] if cut else text))
    if full[: len(context_ids)] == context_ids:
        ids = full[len(context_ids) :]
    else:  # the tokenizer merged across the boundary: tokenize the response alone
        ids = _encode(tokenizer, text[:cap] if cut else text)
    if cut and len(ids) <= max_length + _CUT_MARGIN:  # type: ignore[operator]
        whole = prompt_body if context is prompt_text else _encode(tokenizer, prompt_text)
        return _chat_response(tokenizer, prompt_text, whole, text, None)
    return ids


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not 0 <= max_prompt_length < max_length:
        raise ValueError(
            f"need 0 <= max_prompt_length < max_length, got max_prompt_length="
            f"{max_prompt_length}, max_length={max_length}"
        )


def _truncate(
    prompt: list[int],
    responses: list[list[int]],
    *,
    max_length: int,
    max_prompt_length: int,
    truncation: Truncation,
    bos: int | None,
) -> tuple[list[int], list[list[int]]]:
    longest = max(len(r) for r in responses)
    if len(prompt) + longest > max_length and len(prompt) > max_prompt_length:
        if truncation == "keep_start":
            prompt = prompt[:max_prompt_length]
        else:
            head = prompt[: min(bos_head(prompt, bos), max_prompt_length)]
            tail = max_prompt_length - len(head)
            prompt = head + (prompt[len(prompt) - tail :] if tail else [])
    if len(prompt) + longest > max_length:
        cap = max_length - max_prompt_length
        responses = [r[:cap] for r in responses]
    return prompt, responses


def _prepare(
    pair: PreferencePair,
    tokenizer: PreTrainedTokenizerBase,
    names: tuple[str, ...],
    max_length: int,
    max_prompt_length: int,
    truncation: str | None,
) -> tuple[list[int], list[list[int]]]:
    _check_lengths(max_length, max_prompt_length)
    mode = resolve_truncation(truncation, pair.format)
    prompt, responses = _tokenize_parts(pair, tokenizer, names, max_length, mode == "keep_end")
    return _truncate(
        prompt,
        responses,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation=mode,
        bos=_distinct_bos(tokenizer),
    )


def tokenize_pair(
    pair: PreferencePair,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = 512,
    max_prompt_length: int = 256,
    truncation: str | None = None,
) -> dict[str, list[int]]:
    """Token ids of a pair: ``prompt_input_ids``, ``{chosen,rejected}_{input_ids,labels}``.

    ``*_input_ids`` are prompt + response (+EOS); ``*_labels`` are the same with the prompt
    positions set to -100. Chosen and rejected share the same prompt ids. ``truncation=None``
    or ``"auto"`` means :func:`default_truncation` of the pair's format.
    """
    prompt, (chosen, rejected) = _prepare(
        pair, tokenizer, ("chosen", "rejected"), max_length, max_prompt_length, truncation
    )
    masked = [IGNORE_INDEX] * len(prompt)
    return {
        "prompt_input_ids": prompt,
        "chosen_input_ids": prompt + chosen,
        "chosen_labels": masked + chosen,
        "rejected_input_ids": prompt + rejected,
        "rejected_labels": masked + rejected,
    }


def tokenize_sft(
    pair: PreferencePair,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = 512,
    max_prompt_length: int = 256,
    truncation: str | None = None,
) -> dict[str, list[int]]:
    """``input_ids``/``labels`` of prompt + chosen response, with the rules of tokenize_pair."""
    prompt, (chosen,) = _prepare(
        pair, tokenizer, ("chosen",), max_length, max_prompt_length, truncation
    )
    return {"input_ids": prompt + chosen, "labels": [IGNORE_INDEX] * len(prompt) + chosen}


def tokenize_prompt(prompt: str | list[Message], tokenizer: PreTrainedTokenizerBase,
                    max_prompt_length: int, truncation: str | None = None) -> list[int]:
    """A prompt alone (to sample from) as training tokenizes it: BOS, the chat template with
    its generation prompt, cut to ``max_prompt_length`` the way ``tokenize_pair`` cuts
    prompts."""
    chat = not isinstance(prompt, str)
    dummy: str | list[Message] = [{"role": "assistant", "content": "-"}] if chat else "-"
    fmt = "conversational" if chat else "explicit"
    ids, _ = _tokenize_parts(PreferencePair(prompt, dummy, dummy, "", fmt), tokenizer,
                             ("chosen",))
    if len(ids) <= max_prompt_length:
        return ids
    if resolve_truncation(truncation, fmt) == "keep_start":
        return ids[:max_prompt_length]
    head = ids[: min(bos_head(ids, _distinct_bos(tokenizer)), max_prompt_length)]
    tail = max_prompt_length - len(head)
    return head + (ids[len(ids) - tail :] if tail else [])
