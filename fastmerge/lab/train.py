"""Tokenizer, tiny Llama models, their training and their measures (CPU, deterministic).

Every model is a ``transformers.LlamaForCausalLM`` (untied embeddings). Training is plain
AdamW on next-token loss; ``pretrain`` packs documents into fixed-length sequences,
``finetune`` trains on (prompt, answer) pairs with the loss on the answer only.
"""
from __future__ import annotations

import math
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

from . import data

SPECIAL = ["<pad>", "<bos>", "<eos>", "<q>", "<a>", "<colour>", "<place>"]


def train_tokenizer(world: data.World, vocab_size: int = 384) -> Tokenizer:
    """A byte-pair tokenizer over both languages (Greek and Latin letters), trained on
    sentences of both."""
    rng = random.Random(0)
    texts = [data.document(world, lang, rng) for lang in ("l1", "l2") for _ in range(400)]
    texts += [p + " " + a for lang in ("l1", "l2")
              for p, a, _ in data.questions(world, lang, range(data.N_OBJECTS))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size,
                                                       special_tokens=SPECIAL,
                                                       show_progress=False))
    return tok


def model_config(vocab_size: int, hidden: int = 64, layers: int = 2, seq_len: int = 64):
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden,
                       intermediate_size=3 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=seq_len, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def new_model(config, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def stream(tok: Tokenizer, world, lang_mix: dict, rng: random.Random, n_seqs: int,
           seq_len: int) -> torch.Tensor:
    """``n_seqs`` packed sequences of ``seq_len`` tokens: documents drawn with the
    languages' probabilities ``lang_mix`` ({"l1": p, "l2": 1 - p}), each
    ``<bos> doc <eos>``."""
    langs, probs = zip(*lang_mix.items())
    need = n_seqs * seq_len
    ids: list = []
    while len(ids) < need:
        docs = [data.document(world, rng.choices(langs, probs)[0], rng) for _ in range(64)]
        for enc in tok.encode_batch(docs):
            ids += [1] + enc.ids + [2]
    return torch.tensor(ids[:need]).view(n_seqs, seq_len)


def _lr(step: int, steps: int, lr: float, warmup: int, cosine: bool) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    if not cosine:
        return lr
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def pretrain(model, batches: torch.Tensor, batch_size: int, lr: float, warmup: int = 20,
             cosine: bool = True, save_at=(), seed: int = 0):
    """Next-token training on ``batches`` (n_seqs × seq_len), ``batch_size`` sequences a
    step, one pass. Returns {step: state_dict copy} for the steps in ``save_at``."""
    torch.manual_seed(seed)
    steps = batches.shape[0] // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    saved = {}
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup, cosine)
        x = batches[step * batch_size:(step + 1) * batch_size]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step + 1 in save_at:
            saved[step + 1] = state_dict(model)
    model.eval()
    return saved


def encode_qa(tok: Tokenizer, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """``<bos> prompt answer <eos>`` rows, right-padded, and labels that score the
    answer and ``<eos>`` only (-100 elsewhere)."""
    rows, labels = [], []
    for prompt, answer in pairs:
        p = tok.encode(prompt).ids
        a = tok.encode(answer).ids + [2]
        rows.append([1] + p + a)
        labels.append([-100] * (1 + len(p)) + a)
    n = max(map(len, rows))
    x = torch.tensor([r + [0] * (n - len(r)) for r in rows])
    y = torch.tensor([r + [-100] * (n - len(r)) for r in labels])
    return x, y


def finetune(model, tok, pairs, steps: int, batch_size: int, lr: float, seed: int,
             warmup: int = 10):
    """Supervised fine-tuning on (prompt, answer) pairs, sampled with replacement."""
    x, y = encode_qa(tok, pairs)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = _lr(step, steps, lr, warmup, False)
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
        mask = (x[idx] != 0).long()
        loss = model(input_ids=x[idx], attention_mask=mask, labels=y[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def state_dict(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def task_accuracy(model, tok, qs) -> float:
    """Fraction of questions whose answer has the highest log-likelihood among the
    candidates (sum over the candidate's tokens and ``<eos>``)."""
    pairs, owner = [], []
    for qi, (prompt, _, cands) in enumerate(qs):
        for c in cands:
            pairs.append((prompt, c))
            owner.append(qi)
    x, y = encode_qa(tok, pairs)
    mask = (x != 0).long()
    logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
    tgt = y[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    score = (lp * (tgt != -100)).sum(1)
    correct, i = 0, 0
    for prompt, answer, cands in qs:
        s = score[i:i + len(cands)]
        correct += cands[int(s.argmax())] == answer
        i += len(cands)
    return correct / len(qs)


@torch.no_grad()
def perplexity(model, seqs: torch.Tensor) -> float:
    loss = model(input_ids=seqs, labels=seqs).loss
    return float(torch.exp(loss))
