"""The causal-LM path: loss masks, the LM loss and exact match, DP-SGD on token losses.

A tiny random Llama (2 layers, hidden 32) with the embedded SmolLM2 tokenizer and its chat
template stands in for the decoder; the data is the real chatterbot corpus.
"""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM

from fedlora.config import ConfigError, RunConfig
from fedlora.data.instruct import (
    IGNORE_INDEX,
    RESPONSE,
    TEXT,
    encode_example,
    read_instruction_file,
    render_prompt,
    user_turn,
)
from fedlora.data.tables import load_table, tokenize
from fedlora.lora.spec import LoraSpec
from fedlora.model.lm import evaluate_lm, example_mean_loss
from fedlora.model.models import build_lora_model, load_tokenizer
from fedlora.model.peft_state import state_from_peft
from fedlora.model.train import make_optimizer, train_steps
from fedlora.privacy.dp_sgd import make_private, new_budget

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("auto",), task="causal-lm")


def _tokenizer(tiny_llama):
    return load_tokenizer(str(tiny_llama), "causal-lm")


def test_loss_mask_counts_only_response_tokens(tiny_llama):
    tok = _tokenizer(tiny_llama)
    frame = pd.DataFrame({TEXT: [user_turn("What is two plus two?")], RESPONSE: ["Four."]})
    ids, mask, labels = tokenize(frame, tok, 64, "causal-lm").tensors
    body, header = render_prompt(tok, [{"role": "user", "content": "What is two plus two?"}])
    prompt_len = len(tok(body + header, add_special_tokens=False)["input_ids"])
    answer = [*tok("Four.", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    length = prompt_len + len(answer)
    # prompt tokens are ignored, the answer and its EOS count, padding is ignored
    assert labels[0, :prompt_len].tolist() == [IGNORE_INDEX] * prompt_len
    assert labels[0, prompt_len:length].tolist() == answer
    assert labels[0, length:].tolist() == [IGNORE_INDEX] * (64 - length)
    assert ids[0, prompt_len:length].tolist() == answer
    assert mask[0].tolist() == [1] * length + [0] * (64 - length)
    assert tok.decode(ids[0, :prompt_len]).endswith("<|im_start|>assistant\n")
    assert tok.decode(labels[0, prompt_len:length]) == "Four.<|im_end|>"


def test_truncation_cuts_the_prompt_text_not_the_template_or_the_answer(tiny_llama):
    tok = _tokenizer(tiny_llama)
    ids, labels, cut = encode_example(tok, user_turn("word " * 200), "Yes.", 48)
    assert cut and len(ids) == 48
    answer = [*tok("Yes.", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert [t for t in labels if t != IGNORE_INDEX] == answer
    prompt = tok.decode(ids[: -len(answer)])
    assert prompt.startswith("<|im_start|>system") and "<|im_start|>user\nword word" in prompt
    assert prompt.endswith("word<|im_end|>\n<|im_start|>assistant\n")  # the turn is closed
    # an answer longer than half the budget is cut and has no EOS: it did not end there
    ids, labels, cut = encode_example(tok, user_turn("hi"), "yes " * 100, 64)
    kept = [t for t in labels if t != IGNORE_INDEX]
    assert cut and len(kept) == 32 and tok.eos_token_id not in kept
    _, _, cut = encode_example(tok, user_turn("hi"), "Yes.", 64)
    assert not cut
    with pytest.raises(ConfigError, match="'max-seq-len'"):
        encode_example(tok, user_turn("hi"), "Yes.", 12)


def test_example_mean_loss_matches_a_direct_per_example_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :4] = IGNORE_INDEX
    labels[1, :2] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    expected = []
    for b in range(3):
        terms = []
        for t in range(6):
            target = int(labels[b, t + 1])
            if target != IGNORE_INDEX:
                log_p = logits[b, t].double().log_softmax(-1)
                terms.append(-float(log_p[target]))
        expected.append(np.mean(terms))
    assert float(example_mean_loss(logits, labels)) == pytest.approx(np.mean(expected), rel=1e-6)


def test_exact_match_is_the_greedy_answer(tiny_llama):
    """Teacher-forced exact match equals comparing ``generate``'s greedy output."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = _tokenizer(tiny_llama)
    prompts = [tok(f"question {i}: ", return_tensors="pt")["input_ids"][0] for i in range(4)]
    rows, labels = [], []
    for i, prompt in enumerate(prompts):
        greedy = model.generate(prompt[None], max_new_tokens=5, do_sample=False)
        answer = greedy[0, len(prompt) :].clone()  # what greedy decoding answers (EOS or not)
        if i % 2:  # every other reference differs from the greedy answer in its last token
            answer[-1] = (answer[-1] + 1) % len(tok)
        rows.append(torch.cat([prompt, answer]))
        labels.append(torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer]))
    width = max(len(r) for r in rows)

    def pad(t, value):
        return torch.cat([t, torch.full((width - len(t),), value, dtype=t.dtype)])

    data = TensorDataset(
        torch.stack([pad(r, 0) for r in rows]),
        torch.stack([pad(torch.ones_like(r), 0) for r in rows]),
        torch.stack([pad(lab, IGNORE_INDEX) for lab in labels]),
    )
    _, exact, count = evaluate_lm(model, data, batch_size=4, show_progress=False)
    assert count == 4 and exact == 0.5


def _lm_data(tiny_llama, n=48):
    cfg = RunConfig.from_mapping({"task": "causal-lm", "dataset": "chatterbot"})
    frame = load_table(cfg.data).train.head(n)
    return tokenize(frame, _tokenizer(tiny_llama), 48, "causal-lm")


def test_dp_sgd_on_token_losses_equals_plain_training_without_noise_or_clipping(tiny_llama):
    data = _lm_data(tiny_llama)
    batches = list(DataLoader(data, batch_size=12, shuffle=False))
    plain = build_lora_model(str(tiny_llama), 1, SPEC, seed=0)
    dp = copy.deepcopy(plain)
    train_steps(plain, make_optimizer(plain, 1e-2), batches, show_progress=False)
    budget = new_budget(
        accountant="rdp",
        target_epsilon=float("inf"),
        delta=1e-5,
        num_examples=len(data),
        batch_size=12,
        steps_per_round=4,
        expected_rounds=1,
        noise_multiplier=0.0,
    )
    run = make_private(
        dp, make_optimizer(dp, 1e-2), data, budget=budget, clip_norm=1e6, steps=4, seed=0
    )
    train_steps(run.model, run.optimizer, batches, show_progress=False)
    run.finish()
    a, b = state_from_peft(plain, 1.0).to_state_dict(), state_from_peft(dp, 1.0).to_state_dict()
    assert set(a) == set(b) and any(k.endswith("o_proj.lora_B.weight") for k in a)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_dp_sgd_with_noise_spends_budget_on_the_decoder(tiny_llama):
    data = _lm_data(tiny_llama)
    model = build_lora_model(str(tiny_llama), 1, SPEC, seed=0)
    budget = new_budget(
        accountant="rdp",
        target_epsilon=8.0,
        delta=1e-5,
        num_examples=len(data),
        batch_size=12,
        steps_per_round=4,
        expected_rounds=2,
    )
    before = state_from_peft(model, 1.0).to_state_dict()
    run = make_private(
        model, make_optimizer(model, 1e-2), data, budget=budget, clip_norm=1.0, steps=4, seed=0
    )
    result = train_steps(run.model, run.optimizer, run.loader, show_progress=False)
    run.finish()
    after = state_from_peft(model, 1.0).to_state_dict()
    assert result.steps > 0 and np.isfinite(result.mean_loss)
    assert 0 < budget.epsilon() < 8.0 and budget.steps == 4
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_instruction_file_in_both_forms(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pd.DataFrame({"q": ["hi", "bye"], "a": ["hello", "see you"]}).to_json(
        pairs, orient="records", lines=True
    )
    frame = read_instruction_file(pairs, "q", "a")
    assert list(frame[RESPONSE]) == ["hello", "see you"]
    chat = tmp_path / "chat.jsonl"
    turns = [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    ]
    pd.DataFrame({"messages": turns}).to_json(chat, orient="records", lines=True)
    frame = read_instruction_file(chat, "prompt", "response")
    assert list(frame[RESPONSE]) == ["hello"] and "Be brief." in frame[TEXT][0]
    with pytest.raises(ConfigError, match="'response-column': 'answer'"):
        read_instruction_file(pairs, "q", "answer")
    with pytest.raises(ConfigError, match="'dataset': 'chatterbot' has no labels"):
        RunConfig.from_mapping({"dataset": "chatterbot"})


def test_a_labelled_file_becomes_questions_whose_answer_is_the_label(tmp_path):
    path = tmp_path / "tickets.csv"
    path.write_text("body,queue\n" + "".join(f"ticket {i},{'ab'[i % 2]}\n" for i in range(20)))
    cfg = RunConfig.from_mapping(
        {"task": "causal-lm", "dataset": str(path), "text-column": "body", "label-column": "queue"}
    )
    table = load_table(cfg.data)
    assert set(table.train[RESPONSE]) == {"a", "b"} and table.label_names == ("a", "b")
    assert "one of: a, b" in table.train[TEXT][0]
    # a node's own file in deployment reads the same way, with the server's label names
    from tests.helpers import make_job

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("prompt,response\n" + "".join(f"q{i},r{i}\n" for i in range(10)))
    for own, expected in ((path, {"a", "b"}), (pairs, {f"r{i}" for i in range(10)})):
        job = make_job(cfg, {"data-path": str(own)}, label_names=("a", "b"))
        from fedlora.clients.node_data import frames

        train, test = frames(job.cfg, job.node, job.label_names)
        assert set(train[RESPONSE]) | set(test[RESPONSE]) == expected


def test_embedded_decoder_is_converted_once_and_shared(tmp_path, monkeypatch):
    from fedlora.model import embedded_decoder as decoder

    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_convert(package_folder, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_text("")

    monkeypatch.setattr(decoder, "_convert", fake_convert)
    first = decoder.embedded_decoder_dir(tmp_path)
    again = decoder.embedded_decoder_dir(tmp_path)
    assert first == again and first.parent == tmp_path / "models" and len(calls) == 1
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".tmp-")]

    # a process that loses the race keeps the winner's copy and removes its own
    shutil.rmtree(first)

    def racing_convert(package_folder, out):
        fake_convert(package_folder, out)
        first.mkdir()  # another process renames its finished copy into place meanwhile
        (first / "config.json").write_text('{"winner": true}')
        (first / "model.safetensors").write_text("")

    monkeypatch.setattr(decoder, "_convert", racing_convert)
    assert decoder.embedded_decoder_dir(tmp_path) == first
    assert (first / "config.json").read_text() == '{"winner": true}'
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".tmp-")]
