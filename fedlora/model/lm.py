"""Causal-LM loss, evaluation and sample generation on response tokens.

Training loss is a per-example mean over the example's response tokens, then a mean over
the batch. HF's own loss averages over all tokens of the batch, which makes one example's
gradient depend on the other examples' lengths; DP-SGD clips per example and Opacus
expects ``loss_reduction="mean"`` over examples, so we use the per-example form everywhere
(DP or not, so the two train the same objective).

Evaluation reports the token-level mean cross-entropy (perplexity is its exp) and the
exact match of the greedy answer. Greedy decoding reproduces the reference answer (EOS
included) exactly when, at every response position, the argmax given the reference prefix
is the reference token, so one teacher-forced forward pass gives the generated answer's
exact match without running ``generate``.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedlora.data.instruct import IGNORE_INDEX, encode_prompt
from fedlora.model.device import Placement


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at positions 0..T-2 and the tokens they predict (1..T-1)."""
    return logits[:, :-1, :], labels[:, 1:]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy per predicted token (B, T-1) and the mask of counted tokens."""
    pred, target = shifted(logits, labels)
    mask = target != IGNORE_INDEX
    losses = torch.nn.functional.cross_entropy(
        pred.reshape(-1, pred.shape[-1]).float(),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(target.shape)
    return losses, mask


def example_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over examples of each example's mean response-token loss."""
    losses, mask = token_losses(logits, labels)
    counts = mask.sum(dim=1).clamp(min=1)
    return ((losses * mask).sum(dim=1) / counts).mean()


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    data: TensorDataset,
    batch_size: int,
    desc: str = "eval",
    show_progress: bool = True,
    placement: Placement | None = None,
) -> tuple[float, float, int]:
    """(token-mean loss, exact match of the greedy answer, examples) over ``data``."""
    placement = placement or Placement()
    model.eval()
    total, tokens, exact, count = 0.0, 0, 0, 0
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc=desc, leave=False, disable=not show_progress, mininterval=2.0):
        input_ids, attention_mask, labels = placement.to(batch)
        with placement.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = out.logits
        losses, mask = token_losses(logits, labels)
        total += float((losses * mask).sum())
        tokens += int(mask.sum())
        pred, target = shifted(logits, labels)
        hit = (pred.argmax(dim=-1) == target) | ~mask
        exact += int((hit.all(dim=1) & mask.any(dim=1)).sum())
        count += int(labels.shape[0])
    loss = total / tokens if tokens else math.nan
    return loss, (exact / count if count else math.nan), count


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_len: int,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy answers to stored prompts, cut as in training to ``max_len`` tokens.

    One prompt at a time: no padding side to get wrong.
    """
    model.eval()
    answers = []
    for stored in prompts:
        device = next(model.parameters()).device
        prompt = torch.tensor([encode_prompt(tokenizer, stored, max_len)[0]], device=device)
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers.append(
            tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip()
        )
    return answers
