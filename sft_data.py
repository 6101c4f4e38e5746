"""SFT data: encode, pack, batch, and the answer-only training step. What the two stages that
fine-tune on dialogs share: train_sft.py (SFT and Ghost Attention) and train_rlhf.py (rejection
sampling fine-tunes each Vi on its gold answers the same way).

  dialogs   read_dialogs / write_dialogs: {"messages": [...], "train_on": ...} JSONL
  encode    encode_example: a dialog in Meta's chat format, the loss mask on the answers that
            carry loss (every answer, only the last, or a flag per answer) and their EOS
  pack      fit_examples drops what does not fit (never truncated: the EOS would go), pack_rows
            fills rows of the context length greedily, RowSampler orders the rows over epochs
  batch     make_batch: (B, T) tokens / targets / positions, cu_seqlens so that attention never
            crosses from one packed example into another; forward_batch runs the model on it
  step      train_step: one optimizer step over a step's rows, gradient accumulation over
            micro-batches weighted by each one's share of the step's answer tokens (all ranks)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

import llama2
import training
import world


@dataclass
class Example:
    """One encoded dialog: token ids and the loss mask over them (1 = a token the model learns
    to produce: an answer token or the EOS that ends an answer)."""
    ids: list[int]
    mask: list[int]
    where: str = ""  # "file:line" of its source, for messages

    def __len__(self) -> int:
        return len(self.ids) - 1  # input tokens once shifted (the last token is only a target)


TRAIN_ON = ("all", "last")  # which answers carry loss: every one, only the last, or a list of flags


def _check_train_on(train_on, messages: list[dict]) -> None:
    n = sum(m["role"] == "assistant" for m in messages)
    if isinstance(train_on, list):
        if len(train_on) != n or not all(isinstance(f, bool) for f in train_on):
            raise ValueError(f'"train_on" as a list needs one true/false per assistant message '
                             f"({n}), got {train_on!r}")
    elif train_on not in TRAIN_ON:
        raise ValueError(f'"train_on" must be one of {TRAIN_ON} or a list of true/false per '
                         f"assistant message, got {train_on!r}")


def read_dialogs(path: str) -> list[tuple[list[dict], str, str]]:
    """Read a JSONL file of {"messages": [...]} lines, each optionally with "train_on": "all" |
    "last" | [true/false per assistant message] (which answers carry loss).

    Returns (messages, train_on, "path:line") per dialog. A malformed line (bad JSON, no
    "messages" list, an unknown role, roles out of order, not ending with an assistant message)
    raises ValueError naming the file and line number and what was wrong.
    """
    shape = '{"messages": [{"role": ..., "content": ...}, ...]}'

    def parse(obj, where):
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
            raise ValueError(f'no "messages" list; each line must be {shape}')
        try:
            world.validate_dialog(obj["messages"], ends_with="assistant")
        except ValueError as e:
            raise ValueError(f"bad dialog: {e}") from None
        train_on = obj.get("train_on", "all")
        _check_train_on(train_on, obj["messages"])
        return obj["messages"], train_on, where

    return training.read_jsonl(path, parse, expect=f"each line must be {shape}",
                               missing="give JSONL files or --data world")


def write_dialogs(path: str | Path, dialogs: list[tuple[list[dict], object]]) -> None:
    """Write (messages, train_on) pairs as JSONL, atomically (the GAtt data of a run)."""
    with training.atomic_write(path, "w") as f:
        for messages, train_on in dialogs:
            f.write(json.dumps({"messages": messages, "train_on": train_on}) + "\n")


def encode_example(tokenizer, messages: list[dict], train_on: str = "all", where: str = ""):
    """Encode a dialog ending with an assistant answer; the mask marks the answers that carry loss.

    train_on "all": every assistant answer and its EOS (SFT). "last": only the final answer and
    its EOS. A list of flags, one per assistant message: the answers flagged true (Ghost
    Attention: the kept answers; every other token, other answers included, gets no loss).
    """
    _check_train_on(train_on, messages)
    ids, mask = llama2.encode_dialog(tokenizer, messages, for_training=True)
    if train_on == "all":
        return Example(ids, mask, where)
    # each answer (and its EOS) is one run of 1s in the mask, in order
    runs, i = [], 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    flags = [False] * (len(runs) - 1) + [True] if train_on == "last" else train_on
    if len(runs) != len(flags):
        raise ValueError(f"{where}: found {len(runs)} answers in the encoded dialog, expected "
                         f"{len(flags)}")
    mask = [0] * len(mask)
    for (a, b), keep in zip(runs, flags):
        if keep:
            mask[a:b] = [1] * (b - a)
    return Example(ids, mask, where)


def example_io(ex: Example) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one example: inputs ids[:-1]; target t is ids[t+1] where token t+1
    carries loss (mask 1), else -100 (ignored by the cross-entropy)."""
    x = ex.ids[:-1]
    y = [tok if m else -100 for tok, m in zip(ex.ids[1:], ex.mask[1:])]
    return x, y


def pack_rows(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Greedily fill rows of at most seq_len tokens with examples in the given order.

    Returns the example indices of each row. Every length must be <= seq_len (drop longer
    examples first, see fit_examples).
    """
    rows, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than a row of {seq_len}")
        if cur and used + n > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


def fit_examples(examples: list[Example], seq_len: int) -> tuple[list[Example], list[Example]]:
    """Split examples into (kept, dropped): an example whose inputs exceed seq_len is DROPPED
    (truncating it would cut off its answer's EOS and teach the model not to stop)."""
    kept = [e for e in examples if len(e) <= seq_len]
    dropped = [e for e in examples if len(e) > seq_len]
    return kept, dropped


PAD_ID = 0  # filler token in unused row slots: never a target, and in a segment of its own


def make_batch(examples: list[Example], rows: list[list[int]], pack: bool = True,
               device="cpu") -> dict:
    """Tensors for one micro-batch of rows.

    tokens, targets, positions: (B, T) int64 with T the longest row; unused slots are PAD_ID with
    target -100. pack=True: a row holds several examples back to back, positions restart at 0
    for each, and cu_seqlens (int32, over the flattened B*T tokens) marks every example and every
    row's padding as a segment of its own, so attention stays within an example. pack=False: one
    example per row, positions 0..T-1, no cu_seqlens (causal attention never sees the padding
    that follows a sequence).
    """
    ios = [[example_io(examples[i]) for i in row] for row in rows]
    if not pack and any(len(r) != 1 for r in rows):
        raise ValueError("make_batch(pack=False) needs exactly one example per row")
    T = max(sum(len(x) for x, _ in row) for row in ios)
    tokens, targets, positions, seqlens = [], [], [], []
    for row in ios:
        tok = [t for x, _ in row for t in x]
        tgt = [t for _, y in row for t in y]
        pos = [p for x, _ in row for p in range(len(x))]
        pad = T - len(tok)
        tokens.append(tok + [PAD_ID] * pad)
        targets.append(tgt + [-100] * pad)
        positions.append(pos + list(range(pad)))
        seqlens += [len(x) for x, _ in row] + ([pad] if pad else [])
    batch = {"tokens": torch.tensor(tokens, dtype=torch.long, device=device),
             "targets": torch.tensor(targets, dtype=torch.long, device=device),
             "positions": torch.tensor(positions, dtype=torch.long, device=device),
             "cu_seqlens": None}
    if pack:
        cu = [0]
        for n in seqlens:
            cu.append(cu[-1] + n)
        batch["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32, device=device)
    else:
        batch["positions"] = None  # the model's default 0..T-1
    return batch


def forward_batch(model, batch: dict):
    """model(tokens, targets) with the batch's positions / cu_seqlens -> (logits, loss)."""
    return model(batch["tokens"], batch["targets"], positions=batch["positions"],
                 cu_seqlens=batch["cu_seqlens"])


class RowSampler:
    """Deterministic order of rows over epochs: epoch e visits the rows in a permutation seeded by
    (seed, e); global row number g is epoch g // R, slot g % R. One integer (the step) is the data
    position, so a resumed run continues exactly where it stopped."""

    def __init__(self, n_rows: int, seed: int):
        if n_rows == 0:
            raise ValueError("no training rows: every example was dropped or the data is empty")
        self.R, self.seed = n_rows, seed
        self._epoch, self._perm = -1, None

    def row(self, g: int) -> int:
        epoch, slot = divmod(g, self.R)
        if epoch != self._epoch:
            self._perm, self._epoch = training.epoch_permutation(self.R, self.seed, epoch), epoch
        return int(self._perm[slot])


def train_step(model, optimizer, examples: list[Example], step_rows: list[list[int]],
               micro_batch: int, grad_clip: float, pack: bool, rt) -> tuple[float, float, float, int]:
    """One optimizer step over a step's rows (row = the example indices packed into it), the loss
    the mean over ALL the step's answer tokens: gradient accumulation over micro-batches, each
    weighted by its share of those tokens. Under torchrun each rank takes its slice of the rows;
    DDP averages the gradients over the ranks, so each rank's loss is scaled by world_size to give
    the 1-process gradient. -> (loss, tokens, grad norm, answer tokens), over all ranks."""
    n_kept = sum(sum(examples[i].mask[1:]) for r in step_rows for i in r)  # over ALL ranks' rows
    per_rank = len(step_rows) // rt.world_size
    mine = step_rows[rt.rank * per_rank:(rt.rank + 1) * per_rank]
    stats = torch.zeros(2, dtype=torch.float64, device=rt.device)  # loss sum, tokens
    for m in range(0, per_rank, micro_batch):
        batch = make_batch(examples, mine[m:m + micro_batch], pack, rt.device)
        k = int((batch["targets"] != -100).sum())
        # DDP all-reduces the gradients on the last micro-batch only (forward and backward both
        # inside the context). A micro-batch without answer tokens still runs: every rank must
        # reach that all-reduce; its loss is 0 * the mean of nothing, so it is skipped as 0
        with training.sync_gradients(model, m + micro_batch >= per_rank):
            with rt.autocast():
                _, loss = forward_batch(model, batch)
            loss = loss if k else loss.nan_to_num(0.0) * 0.0
            (loss * (k / n_kept * rt.world_size)).backward()
        stats += torch.tensor([loss.item() * k, batch["tokens"].numel()],
                              dtype=torch.float64, device=rt.device)
    gnorm = training.clip_and_step(model, optimizer, grad_clip)
    if rt.distributed:  # the step's numbers over all ranks, for the log
        torch.distributed.all_reduce(stats)
    return stats[0].item() / max(1, n_kept), stats[1].item(), gnorm, n_kept
