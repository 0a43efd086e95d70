"""Text side of the VLM stage: tokenizers and the conversation template.

* :func:`word_tokenizer` builds a tiny offline word-level tokenizer (for the synthetic VQA
  task on CPU); :func:`load_tokenizer` loads a real LLM tokenizer (e.g. Vicuna).
* :class:`ConversationTemplate` turns a LLaVA-style conversation into ``input_ids`` with one
  ``IMAGE_TOKEN_INDEX`` placeholder and ``labels`` that train only the assistant answers.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # LLaVA's id for the image placeholder; the model splices features there
IGNORE_INDEX = -100  # label value that cross-entropy ignores

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

# The system prompt of LLaVA-1.5 (conversation template "vicuna_v1").
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

HUMAN, GPT = "human", "gpt"


# ------------------------------------------------------------------------------ tokenizers
def _is_punctuation(char: str) -> bool:
    # Same rule as the ``tokenizers`` Punctuation pre-tokenizer: ASCII punctuation or Unicode P*.
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def split_words(text: str) -> list[str]:
    """Lower-cased words exactly as :func:`word_tokenizer` splits them.

    Whitespace separates words and every punctuation character is a word of its own:
    ``"How many shapes?"`` -> ``["how", "many", "shapes", "?"]``.
    """
    words: list[str] = []
    for chunk in text.lower().split():
        current = ""
        for char in chunk:
            if _is_punctuation(char):
                if current:
                    words.append(current)
                    current = ""
                words.append(char)
            else:
                current += char
        if current:
            words.append(current)
    return words


def word_tokenizer(words: Iterable[str]) -> Any:
    """An offline word-level ``PreTrainedTokenizerFast`` over ``words``.

    Ids are deterministic: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3, then ``words``
    lower-cased in the given order without duplicates. Text is lower-cased, split on whitespace
    and punctuation; anything not in the vocabulary becomes ``<unk>``. Nothing is added
    automatically around encoded text (the conversation template adds bos/eos itself).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        word = str(word).lower()
        if not word or any(char.isspace() for char in word):
            raise ValueError(f"vocabulary entries must be single non-empty words, got {word!r}")
        if len(split_words(word)) != 1:
            raise ValueError(
                f"vocabulary entry {word!r} would be split by the pre-tokenizer into {split_words(word)}; "
                "pass punctuation as separate entries"
            )
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="right",
        model_max_length=1 << 30,
    )


def load_tokenizer(name_or_path: str, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` with a pad token guaranteed.

    When the tokenizer has no pad token, the unk token is used (LLaVA's choice for Vicuna),
    else eos. Failure (e.g. offline without a cached copy) raises ``OSError`` naming the path.
    """
    from transformers import AutoTokenizer

    kwargs.setdefault("use_fast", True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except Exception as error:
        raise OSError(
            f"could not load a tokenizer from {name_or_path!r} ({type(error).__name__}: {error}). "
            "Without internet access the model must already be in the Hugging Face cache "
            "(set HF_HUB_OFFLINE=1 to use it) or name_or_path must be a local directory "
            "containing the tokenizer files."
        ) from error
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        if fallback is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither pad, unk nor eos token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer


# ------------------------------------------------------------------------------ template
class ConversationTooLong(ValueError):
    """Truncating the conversation to ``max_length`` would cut the image placeholder."""


def check_conversation(conversation: Sequence[dict[str, str]]) -> None:
    """Raise ``ValueError`` unless turns alternate human/gpt, starting with human."""
    if not conversation:
        raise ValueError("conversation is empty")
    for position, turn in enumerate(conversation):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {position} must be a dict with 'from' and 'value', got {turn!r}")
        expected = HUMAN if position % 2 == 0 else GPT
        if turn["from"] != expected:
            raise ValueError(
                f"turn {position} is from {turn['from']!r}, expected {expected!r}: turns must alternate "
                f"{HUMAN!r}/{GPT!r} starting with {HUMAN!r}"
            )
        if not isinstance(turn["value"], str):
            raise ValueError(f"turn {position} value must be a string, got {type(turn['value']).__name__}")
    placeholders = sum(turn["value"].count(IMAGE_TOKEN) for turn in conversation)
    if placeholders > 1:
        raise ValueError(
            f"conversation has {placeholders} {IMAGE_TOKEN} placeholders; at most one is supported"
        )
    if any(IMAGE_TOKEN in turn["value"] for turn in conversation if turn["from"] == GPT):
        raise ValueError(f"the {IMAGE_TOKEN} placeholder must be in a human turn")


@dataclass
class ConversationTemplate:
    """Vicuna-v1 conversation format as used by LLaVA-1.5.

    Rendered: ``"{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"``.

    Tokenisation (see :meth:`tokenize`) goes segment by segment so that no tokenizer needs to
    know ``<image>`` and the label mask is exact:

    * ``<s>`` (when the tokenizer has a bos token and ``add_bos``), not trained;
    * each prompt ``"{system} USER: {q} ASSISTANT:"`` (system only before the first question),
      split at ``<image>``, the pieces tokenized without special tokens and one
      ``IMAGE_TOKEN_INDEX`` put between them, not trained;
    * each answer tokenized on its own, followed by the tokenizer's eos id, trained (labels
      equal ``input_ids``).

    Whitespace at segment boundaries is not tokenized (SentencePiece tokenizers encode the
    word-initial space of the answer themselves).
    """

    system: str = VICUNA_SYSTEM
    user: str = "USER"
    assistant: str = "ASSISTANT"
    separator: str = " "
    add_bos: bool = True

    # --------------------------------------------------------------------------- strings
    def prompt_text(self, question: str, first: bool) -> str:
        prefix = f"{self.system}{self.separator}" if first and self.system else ""
        return f"{prefix}{self.user}: {question}{self.separator}{self.assistant}:"

    def render(self, conversation: Sequence[dict[str, str]], eos: str = EOS_TOKEN) -> str:
        """The conversation as one string (for display and logs)."""
        check_conversation(conversation)
        text = f"{self.system}{self.separator}" if self.system else ""
        for turn in conversation:
            if turn["from"] == HUMAN:
                text += f"{self.user}: {turn['value']}{self.separator}"
            else:
                text += f"{self.assistant}: {turn['value']}{eos}"
        if conversation[-1]["from"] == HUMAN:
            text += f"{self.assistant}:"
        return text

    # --------------------------------------------------------------------------- ids
    @staticmethod
    def _encode(tokenizer: Any, text: str) -> list[int]:
        if not text.strip():
            return []
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize(
        self,
        conversation: Sequence[dict[str, str]],
        tokenizer: Any,
        max_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` as 1-D LongTensors of equal length.

        ``labels`` is ``IGNORE_INDEX`` on bos, system, user and image positions and equals
        ``input_ids`` on answer tokens and the eos after each answer. A conversation that
        ends with a human turn ends with the ``"ASSISTANT:"`` generation prompt (no labels).

        Truncation: when longer than ``max_length``, the first ``max_length`` tokens are kept
        (later turns, or the end of an answer, are dropped). If that would cut the image
        placeholder, :class:`ConversationTooLong` is raised instead.
        """
        check_conversation(conversation)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; answers must end with one")
        ids: list[int] = []
        trained: list[bool] = []

        def add(new: list[int], train: bool) -> None:
            ids.extend(new)
            trained.extend([train] * len(new))

        if self.add_bos and tokenizer.bos_token_id is not None:
            add([tokenizer.bos_token_id], False)
        for position, turn in enumerate(conversation):
            if turn["from"] == HUMAN:
                pieces = self.prompt_text(turn["value"], first=position == 0).split(IMAGE_TOKEN)
                for number, piece in enumerate(pieces):
                    if number:
                        add([IMAGE_TOKEN_INDEX], False)
                    add(self._encode(tokenizer, piece), False)
            else:
                add(self._encode(tokenizer, turn["value"]) + [tokenizer.eos_token_id], True)

        if max_length is not None and len(ids) > max_length:
            if IMAGE_TOKEN_INDEX in ids and ids.index(IMAGE_TOKEN_INDEX) >= max_length:
                raise ConversationTooLong(
                    f"conversation is {len(ids)} tokens and its {IMAGE_TOKEN} placeholder is at position "
                    f"{ids.index(IMAGE_TOKEN_INDEX)}: truncating to max_length={max_length} would cut it"
                )
            ids, trained = ids[:max_length], trained[:max_length]
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.where(torch.tensor(trained, dtype=torch.bool), input_ids, IGNORE_INDEX)
        return input_ids, labels

    def prompt_ids(self, conversation: Sequence[dict[str, str]], tokenizer: Any) -> torch.Tensor:
        """Input ids up to the last assistant prompt, for generation: a conversation ending with
        a gpt turn loses that turn."""
        if conversation and conversation[-1].get("from") == GPT:
            conversation = conversation[:-1]
        return self.tokenize(conversation, tokenizer)[0]
