"""Ghost Attention data construction and the judged evaluation of chat models (for train_sft.py).

Ghost Attention (Llama 2 paper §3.3 and A.3.5, SPEC.md §6) is a way of building fine-tuning
data, not a change to the model: no extra token, no change to attention.

  1. take user prompts u1..un (world.gatt_dialogs) and a standing instruction `inst`;
  2. append `inst` to EVERY user message and sample the replies a1..an with the current model,
     turn by turn, the chosen reply going into the history; here K replies are sampled per turn
     and the world's judge keeps the best (rejection sampling), so that the replies follow `inst`;
  3. for training, keep `inst` only once, as the system message (world.with_instruction_as_system),
     and zero the loss on all tokens of the previous turns, assistant answers included.

Which turns carry loss: dialog [system=inst, u1, a1, ..., un, an] becomes one training sample per
turn k = 1..n, the dialog cut after a_k, with "train_on": "last": the loss covers only a_k and its
EOS. A turn whose chosen reply does not obey `inst` or does not end with EOS gives no sample (it
stays in the history of later turns, without loss).

Evaluation (run_eval): greedy judged scores on held-out prompts (overall, per family, per level),
EOS rate and answer length; pass@1 against best-of-K by the judge; and instruction adherence at
each turn of 12-turn held-out dialogs whose instruction is given once as the system message, the
model's own replies going into the history, drawn as a PNG (adherence against turn).
"""
from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import llama2
import training
import world

# -----------------------------------------------------------------------------------------------
# generation


@dataclass
class Reply:
    text: str      # the reply, EOS removed, cut at a chat tag (a model writing one starts a turn)
    eos: bool      # ended with EOS (rather than hitting max_new_tokens)
    n_tokens: int  # generated tokens, EOS included


_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


def clean_reply(text: str, stop_at_newline: bool = False) -> str:
    """Cut a generated text at the first chat tag (and, for a base model, at the first newline),
    so that it can go back into a dialog as an assistant message."""
    cut = len(text)
    for s in _TAGS + (("\n",) if stop_at_newline else ()):
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()


def generate_replies(model, tokenizer, dialogs: list[list[dict]], *, n: int = 1,
                     temperature: float = 0.0, top_p: float = 0.9, max_new_tokens: int = 48,
                     seed: int = 0, batch: int = 64, stop_at_newline: bool = False,
                     rt: training.Runtime | None = None) -> list[list[Reply] | None]:
    """n replies to each dialog (ending with a user message), batched; temperature 0 is greedy.

    A dialog whose prompt leaves no room in the context gets None. Prompts are sorted by length
    before batching, since a batch costs (longest - shortest prompt + new tokens) decoding steps.
    """
    max_len = model.args.max_seq_len
    prompts = [llama2.encode_dialog(tokenizer, d)[0] for d in dialogs]
    jobs = sorted(((len(p), i, j) for i, p in enumerate(prompts) if len(p) < max_len - 1
                   for j in range(n)))
    out: list[list[Reply] | None] = [None if len(p) >= max_len - 1 else [None] * n
                                     for p in prompts]
    autocast = rt.autocast() if rt is not None else contextlib.nullcontext()
    model.eval()
    with autocast:
        for c in range(0, len(jobs), batch):
            chunk = jobs[c:c + batch]
            gens = model.generate([prompts[i] for _, i, _ in chunk], max_new_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed + c,
                                  eos_id=tokenizer.eos_id)
            for (_, i, j), g in zip(chunk, gens):
                eos = bool(g) and g[-1] == tokenizer.eos_id
                text = tokenizer.decode(g[:-1] if eos else g)
                out[i][j] = Reply(clean_reply(text, stop_at_newline), eos, len(g))
    model.free_cache()
    return out


# -----------------------------------------------------------------------------------------------
# Ghost Attention data


def build_gatt_data(model, tokenizer, cfg, rt=None) -> tuple[list[tuple[list[dict], str]], dict]:
    """Roll out world.gatt_dialogs with the instruction in every user message (best of cfg.gatt_k
    samples per turn by the judge), then turn each dialog into per-turn training samples with the
    instruction only in the system message and loss on the last answer only.

    Returns ([(messages, "last"), ...], stats).
    """
    levels = tuple(int(x) for x in cfg.gatt_levels.split(","))
    seeds = world.gatt_dialogs(cfg.gatt_n, seed=cfg.seed + 3, min_turns=cfg.gatt_min_turns,
                               max_turns=cfg.gatt_max_turns, levels=levels)
    # histories with the instruction appended to every user message (what the model answers)
    histories: list[list[dict]] = [[] for _ in seeds]
    good: list[list[bool]] = [[] for _ in seeds]  # per turn: chosen reply obeys and ends in EOS
    alive = [True] * len(seeds)
    n_eos = n_obey = n_turns = 0
    for t in range(max(len(s.prompts) for s in seeds)):
        active = [i for i, s in enumerate(seeds) if alive[i] and t < len(s.prompts)]
        if not active:
            break
        for i in active:
            histories[i].append({"role": "user",
                                 "content": seeds[i].prompts[t] + " " + seeds[i].inst.text})
        replies = generate_replies(model, tokenizer, [histories[i] for i in active],
                                   n=cfg.gatt_k, temperature=cfg.gatt_temperature,
                                   max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 7919 + t,
                                   batch=cfg.gen_batch, rt=rt)
        for i, cands in zip(active, replies):
            if cands is None:  # the history no longer fits the context: the dialog ends here
                alive[i] = False
                histories[i].pop()
                continue
            # the judge picks the best candidate (ties: the first sampled)
            scores = [world.score(histories[i], c.text, c.eos).total for c in cands]
            best = cands[int(np.argmax(scores))]
            histories[i].append({"role": "assistant", "content": best.text})
            obeys = seeds[i].inst.obeys(best.text)
            good[i].append(obeys and best.eos)
            n_turns += 1
            n_eos += best.eos
            n_obey += obeys
    samples = []
    for s, h, g in zip(seeds, histories, good):
        if not h:
            continue
        # the instruction once, as the system message; then one sample per kept turn
        train = world.with_instruction_as_system(h, s.inst)  # [system, u1, a1, u2, a2, ...]
        for k, ok in enumerate(g):
            if ok:
                samples.append((train[:1 + 2 * (k + 1)], "last"))
    stats = {"dialogs": len(seeds), "turns": n_turns, "kept_turns": len(samples),
             "samples": len(samples), "eos_rate": n_eos / max(1, n_turns),
             "obey_rate": n_obey / max(1, n_turns), "k": cfg.gatt_k,
             "temperature": cfg.gatt_temperature}
    return samples, stats


# -----------------------------------------------------------------------------------------------
# evaluation


def with_fewshot(dialog: list[dict], k: int, rng: random.Random, levels: tuple) -> list[dict]:
    """The dialog with k solved training problems as earlier turns (after any system message), the
    example answers obeying whatever instruction the dialog puts in force: a few-shot prompt for
    a pretrained model."""
    names = world.find_instructions(dialog)
    inst = world.Standing(tuple(names), "") if names else None
    shots = []
    for _ in range(k):
        p = world.sample_problem(rng, "train", level=rng.choice(levels))
        shots += [{"role": "user", "content": p.prompt(rng)},
                  {"role": "assistant", "content": world.careful_answer(p, rng, inst)}]
    head = dialog[:1] if dialog[0]["role"] == "system" else []
    return head + shots + dialog[len(head):]


def rollout(model, tokenizer, dialogs: list[list[dict]], cfg, rt=None) -> list[list[str]]:
    """Answer each dialog's user turns one by one with greedy decoding, the model's own replies
    going into the history (the system message is kept). A dialog stops when it no longer fits
    the context. Returns the replies per dialog."""
    histories = [[m for m in d[:1] if m["role"] == "system"] for d in dialogs]
    users = [world.user_turns(d) for d in dialogs]
    answers: list[list[str]] = [[] for _ in dialogs]
    alive = [True] * len(dialogs)
    for t in range(max(len(u) for u in users)):
        active = [i for i in range(len(dialogs)) if alive[i] and t < len(users[i])]
        if not active:
            break
        for i in active:
            histories[i].append({"role": "user", "content": users[i][t]})
        replies = generate_replies(model, tokenizer, [histories[i] for i in active],
                                   max_new_tokens=cfg.max_new_tokens, batch=cfg.gen_batch,
                                   stop_at_newline=cfg.fewshot > 0, rt=rt)
        for i, r in zip(active, replies):
            if r is None:
                alive[i] = False
                continue
            histories[i].append({"role": "assistant", "content": r[0].text})
            answers[i].append(r[0].text)
    return answers


def run_eval(model, tokenizer, cfg, rt=None, label: str = "model") -> dict:
    """Judged evaluation of a chat model; writes <out_dir>/eval.jsonl and adherence.png and
    returns the summary (also the last line of eval.jsonl)."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    levels = tuple(int(x) for x in cfg.eval_levels.split(","))
    rng = random.Random(cfg.seed)
    records = []
    t0 = time.perf_counter()

    def shown(prompts):
        return [with_fewshot(d, cfg.fewshot, rng, levels) for d in prompts] if cfg.fewshot \
            else prompts

    # 1. greedy answers to held-out prompts, judged
    prompts = world.eval_prompts(cfg.eval_n, seed=cfg.seed + 1, levels=levels)
    greedy = generate_replies(model, tokenizer, shown(prompts), max_new_tokens=cfg.max_new_tokens,
                              batch=cfg.gen_batch, stop_at_newline=cfg.fewshot > 0, rt=rt)
    texts = [g[0].text if g else "" for g in greedy]
    eos = [bool(g and g[0].eos) for g in greedy]
    summary = world.summarize(prompts, texts, eos)
    for d, g, text, e in zip(prompts, greedy, texts, eos):
        s = world.score(d, text, e)
        records.append({"kind": "greedy", "messages": d, "response": text, "eos": e,
                        "n_tokens": g[0].n_tokens if g else 0, "score": s.total,
                        "content": s.content, "instruction": s.instruction, "form": s.form,
                        "family": world.parse_dialog(d)[0].family})
    summary["eos_rate"] = sum(eos) / len(eos)
    summary["correct"] = sum(r["content"] == 1.0 for r in records) / len(records)
    summary["answer_tokens"] = sum(r["n_tokens"] for r in records) / len(records)
    summary["answer_words"] = sum(len(t.split()) for t in texts) / len(texts)
    summary["no_room"] = sum(g is None for g in greedy)
    t_greedy = time.perf_counter() - t0

    # 2. pass@1 against best-of-K: K samples per prompt, the judge picks the best
    bo_prompts = prompts[:cfg.eval_bestof_n]
    samples = generate_replies(model, tokenizer, shown(bo_prompts), n=cfg.eval_k,
                               temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens,
                               seed=cfg.seed + 11, batch=cfg.gen_batch,
                               stop_at_newline=cfg.fewshot > 0, rt=rt)
    best, mean, any_ok, ok = [], [], [], []
    for d, cands in zip(bo_prompts, samples):
        sc = [world.score(d, c.text, c.eos) for c in cands] if cands else []
        tot = [s.total for s in sc] or [0.0]
        best.append(max(tot))
        mean.append(sum(tot) / len(tot))
        ok.append(sum(s.content == 1.0 for s in sc) / max(1, len(sc)))
        any_ok.append(any(s.content == 1.0 for s in sc))
        records.append({"kind": "bestof", "messages": d, "responses": [c.text for c in cands or []],
                        "scores": tot})
    n_bo = max(1, len(bo_prompts))
    summary["bestof"] = {
        "k": cfg.eval_k, "temperature": cfg.eval_temperature, "n": len(bo_prompts),
        "greedy_score": sum(r["score"] for r in records[:len(bo_prompts)]) / n_bo,
        "pass1_score": sum(mean) / n_bo, "bestof_score": sum(best) / n_bo,
        "pass1_correct": sum(ok) / n_bo, "passk_correct": sum(any_ok) / n_bo,
        "greedy_correct": sum(r["content"] == 1.0 for r in records[:len(bo_prompts)]) / n_bo,
    }
    t_bestof = time.perf_counter() - t0 - t_greedy

    # 3. adherence by turn: instruction given once (system message), the model's replies in
    #    the history, greedy decoding
    dialogs = world.eval_multiturn(cfg.eval_mt_n, seed=cfg.seed + 2, turns=cfg.eval_turns)
    answers = rollout(model, tokenizer, dialogs, cfg, rt)
    adherence = world.adherence_by_turn(dialogs, answers)
    reached = [sum(len(a) > k for a in answers) for k in range(cfg.eval_turns)]
    for d, a in zip(dialogs, answers):
        records.append({"kind": "rollout", "messages": d, "responses": a})
    summary["adherence_by_turn"] = adherence
    summary["dialogs_reaching_turn"] = reached
    summary["seconds"] = {"greedy": t_greedy, "bestof": t_bestof,
                          "rollout": time.perf_counter() - t0 - t_greedy - t_bestof}
    summary.update({"kind": "summary", "label": label, "checkpoint": cfg.checkpoint,
                    "fewshot": cfg.fewshot, "levels": list(levels)})

    path = out_dir / "eval.jsonl"
    with open(path, "w") as f:
        for r in records + [summary]:
            f.write(json.dumps(r) + "\n")
    curves = {label: adherence}
    for other in [p for p in cfg.plot_with.split(",") if p]:
        s = read_summary(other)
        curves[s["label"]] = s["adherence_by_turn"]
    plot_adherence(curves, out_dir / "adherence.png")
    print(format_summary(summary))
    print(f"wrote {path} and {out_dir / 'adherence.png'}")
    return summary


def read_summary(path: str) -> dict:
    """The summary record (last line) of an eval.jsonl written by run_eval."""
    if not Path(path).is_file():
        raise SystemExit(f"error: --plot_with {path}: no such file (run --eval first)")
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    s = json.loads(lines[-1]) if lines else {}
    if s.get("kind") != "summary":
        raise SystemExit(f"error: {path} does not end with an eval summary; rerun --eval")
    return s


def format_summary(s: dict) -> str:
    """A few readable lines of an eval summary."""
    fam = " ".join(f"{k} {v:.2f}" for k, v in s["by_family"].items())
    bo = s["bestof"]
    adh = " ".join(f"{a:.0%}" for a in s["adherence_by_turn"])
    return (f"[{s['label']}] judged score {s['total']:.3f} (content {s['content']:.3f}, "
            f"instruction {s['instruction']:.3f}, form {s['form']:.3f}), correct "
            f"{s['correct']:.1%}, EOS {s['eos_rate']:.1%}, {s['answer_tokens']:.1f} tokens / "
            f"{s['answer_words']:.1f} words per answer, n={s['n']}\n"
            f"  by family: {fam}\n"
            f"  best-of-{bo['k']} (T={bo['temperature']}, n={bo['n']}): greedy "
            f"{bo['greedy_score']:.3f}, pass@1 {bo['pass1_score']:.3f}, best-of-{bo['k']} "
            f"{bo['bestof_score']:.3f} | correct: greedy {bo['greedy_correct']:.1%}, pass@1 "
            f"{bo['pass1_correct']:.1%}, pass@{bo['k']} {bo['passk_correct']:.1%}\n"
            f"  adherence by turn 1..{len(s['adherence_by_turn'])}: {adh} "
            f"(dialogs reaching each turn: {s['dialogs_reaching_turn']})")


# -----------------------------------------------------------------------------------------------
# plot: adherence against turn (PNG, with training.py's numpy + zlib writer)

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def plot_adherence(curves: dict[str, list[float]], png, width: int = 800, height: int = 500):
    """Adherence (0..100%) against turn, one line per model (e.g. without and with GAtt)."""
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 90, width - 30, 40, height - 90
    n_turns = max([len(c) for c in curves.values()] + [2])
    black, grey = (0, 0, 0), (225, 225, 225)

    def px(turn, frac):
        return (left + (turn - 1) / (n_turns - 1) * (right - left),
                bottom - frac * (bottom - top))

    for pct in range(0, 101, 20):
        _, y = px(1, pct / 100)
        training.draw_line(img, left, y, right, y, grey, 1)
        training.draw_text(img, left - 14 - 12 * len(f"{pct}%"), int(y) - 7, f"{pct}%", black)
    for t in range(1, n_turns + 1):
        x, _ = px(t, 0)
        training.draw_line(img, x, top, x, bottom, grey, 1)
        training.draw_text(img, int(x) - 6 * len(str(t)), bottom + 10, str(t), black)
    training.draw_line(img, left, bottom, right, bottom, black, 2)
    training.draw_line(img, left, top, left, bottom, black, 2)
    training.draw_text(img, (left + right) // 2 - 24, bottom + 34, "turn", black)
    training.draw_text(img, 8, 10, "instruction adherence (given once at turn 1)", black)
    for (name, ys), color in zip(curves.items(), _COLORS):
        pts = [px(t + 1, a) for t, a in enumerate(ys)]
        for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
            training.draw_line(img, xa, ya, xb, yb, color, 3)
        for x, y in pts:
            img[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4] = color
    # the legend in a row under the axis label
    for i, (name, color) in enumerate(zip(curves, _COLORS)):
        x = left + 250 * i
        training.draw_line(img, x, height - 22, x + 30, height - 22, color, 3)
        training.draw_text(img, x + 40, height - 28, name[:16], black)
    training.write_png(png, img)
