"""pipeline.py's restart logic and report.py, on the tiny size (a 2-layer model, a few steps per stage):
a finished stage is skipped, a stage stopped midway resumes with --resume and ends bitwise equal to
an uninterrupted run, --fresh starts over, a changed input reruns what reads it, and the report
says "not run" for the stages that did not run. The stages run as real subprocesses."""
import json
import math
import os
import shutil
import shlex
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pipeline  # noqa: E402
import report  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the subprocesses inherit it: a small shared CPU
UNTIL_SFT = ["--size", "tiny", "--until", "sft", "--skip", "eval_pretrain"]


def run(out, capfd, *flags):
    rc = pipeline.main([*UNTIL_SFT, "--out_dir", str(out), *flags])
    text = capfd.readouterr().out
    assert rc == 0, text[-3000:]
    return text


def marker(out, stage, name="done.json"):
    p = Path(out) / stage / name
    return json.loads(p.read_text()) if p.is_file() else None


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """world_text -> pretrain -> sft, uninterrupted (eval_pretrain left out with --skip)."""
    out = tmp_path_factory.mktemp("pipe") / "a"
    assert pipeline.main([*UNTIL_SFT, "--out_dir", str(out)]) == 0
    return out


def test_finished_stages_are_skipped_and_a_mid_run_checkpoint_is_not_finished(base, capfd):
    ids = {s: marker(base, s)["id"] for s in ("world_text", "pretrain", "sft")}
    text = run(base, capfd)
    for s in ("world_text", "pretrain", "sft"):
        assert f"] {s}:" in text and marker(base, s)["id"] == ids[s]
    assert text.count("skip: finished") == 3 and "$ python" not in text
    assert "skipped: --skip" in text  # eval_pretrain
    # a done marker records the command with $OUT for the folder, and the stages it read
    m = marker(base, "sft")
    assert m["deps"] == {"pretrain": ids["pretrain"]}
    assert "--checkpoint" in m["argv"] and "$OUT/pretrain" in m["argv"]
    # an output that vanished makes the stage run again, not count as finished
    state, why = pipeline.stage_state(
        next(s for s in pipeline.build_stages(pipeline.Config(size="tiny"), base) if s.name == "sft"),
        base, ids)
    assert state == "done"
    ck = base / "sft" / "ckpt.pt"
    ck.rename(ck.with_suffix(".bak"))
    try:
        state, why = pipeline.stage_state(
            next(s for s in pipeline.build_stages(pipeline.Config(size="tiny"), base)
                 if s.name == "sft"), base, ids)
        assert state == "new" and "ckpt.pt is gone" in why
    finally:
        ck.with_suffix(".bak").rename(ck)


def test_a_stage_stopped_midway_resumes_and_equals_the_uninterrupted_run(base, tmp_path, capfd):
    out = tmp_path / "b"
    out.mkdir()
    # a copy of the finished stages still counts as finished ($OUT in the markers)
    for d in ("world_text", "pretrain"):
        shutil.copytree(base / d, out / d)
    shutil.copy(base / "pipeline.json", out / "pipeline.json")
    text = run(out, capfd, "--stop_at", "sft:1")
    assert text.count("skip: finished") == 2 and "--stop_at_step 1" in text
    assert "stopped sft at 1" in text
    # the checkpoint written mid-run is there, and the stage is not finished
    assert torch.load(out / "sft" / "ckpt.pt", weights_only=True)["step"] == 1
    assert marker(out, "sft") is None and marker(out, "sft", "started.json") is not None
    state, _ = pipeline.stage_state(
        next(s for s in pipeline.build_stages(pipeline.Config(size="tiny"), out) if s.name == "sft"),
        out, {"pretrain": marker(out, "pretrain")["id"]})
    assert state == "partial"
    text = run(out, capfd)
    assert "--resume" in text and "resumed from" in text and "at step 1" in text
    assert marker(out, "sft") is not None
    a = torch.load(base / "sft" / "ckpt.pt", weights_only=True)
    b = torch.load(out / "sft" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] > 1
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    # a stage that read a stage which ran again runs again itself (here: pretrain's id changes)
    m = marker(out, "pretrain")
    m["id"] = "0" * 32
    (out / "pretrain" / "done.json").write_text(json.dumps(m))
    st = pipeline.stage_state(next(s for s in pipeline.build_stages(
        pipeline.Config(size="tiny"), out) if s.name == "sft"), out, {"pretrain": m["id"]})
    assert st == ("new", "finished, but a stage it reads has run again since: runs again")

    # --fresh starts over: every stage folder goes, the first stage runs again
    old = marker(out, "world_text")["id"]
    text = pipeline.main(["--size", "tiny", "--until", "world_text", "--out_dir", str(out),
                          "--fresh"])
    text = capfd.readouterr().out
    assert "fresh start" in text and "$ python world.py text" in text
    assert marker(out, "world_text")["id"] != old
    assert not (out / "pretrain").exists() and not (out / "sft").exists()


def test_the_report_says_not_run_for_missing_stages(base, tmp_path):
    text = report.write_report(base, tmp_path / "r")
    assert (tmp_path / "r" / "REPORT.md").read_text() == text
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "not run" not in rows["pretraining loss (§2.2, Fig. 5)"]
    assert "floor: uniform guess ln(384)" in rows["pretraining loss (§2.2, Fig. 5)"]
    for name in ("RM accuracy by rating (§3.2.2, Table 8)", "best-of-N (§3.2.3, Fig. 7)",
                 "temperature (Fig. 8)", "PPO (§3.2.3)", "GAtt: instruction kept by turn (§3.3, Fig. 9-10)"):
        assert "| not run" in rows[name], name
    assert "80.7 / 67.5 / 60.9 / 54.7 / 63.2" in rows["RM accuracy by rating (§3.2.2, Table 8)"]
    import matplotlib.image
    assert matplotlib.image.imread(tmp_path / "r" / "report_pretrain_loss.png").shape[0] > 100
    assert "## Time per stage" in text and "| pretrain |" in text
    # the recipe's total without the ablations: a fake ablation stage's minute counts apart
    recipe = next(ln for ln in text.splitlines() if ln.startswith("| the recipe |"))
    (base / "rs_oracle").mkdir(exist_ok=True)
    (base / "rs_oracle" / "done.json").write_text(json.dumps({"seconds": 60.0, "finished": "z"}))
    text = report.write_report(base, tmp_path / "r2")
    assert recipe in text and "| rs_oracle (ablation) | 1m00s | z |" in text
    assert "| ablations | 1m00s | |" in text
    shutil.rmtree(base / "rs_oracle")
    # REPORT.json: every table row of REPORT.md (counted here by its lines) with its numbers
    got = json.loads((tmp_path / "r2" / "REPORT.json").read_text())["tables"]
    md_rows = [ln for ln in text.splitlines() if ln.startswith("|") and not set(ln) <= set("|-: ")]
    assert sum(1 + len(t["rows"]) for t in got) == len(md_rows)
    ppo_row = next(r for t in got for r in t["rows"] if r["cells"][0] == "PPO (§3.2.3)")
    assert ppo_row["cells"][2] == "not run" and ppo_row["numbers"][0] == [3.2, 3.0]
    assert next(t for t in got if t["section"] == "Time per stage")["rows"]


def test_report_json_tables_by_hand():
    md = ("# Title\ntext | not a table\n\n## Rewards\n\n| model | judged | win |\n|---|:-:|---|\n"
          "| SFT | 0.702 (+-0.010) | 1,234 of 2,000 |\n| V1 at T0.6 | -0.5e-3 | 46.5% |\nafter\n")
    assert report.tables_of(md) == [{
        "section": "Rewards", "header": ["model", "judged", "win"],
        "rows": [{"cells": ["SFT", "0.702 (+-0.010)", "1,234 of 2,000"],
                  "numbers": [[], [0.702, 0.01], [1234.0, 2000.0]]},
                 {"cells": ["V1 at T0.6", "-0.5e-3", "46.5%"],
                  "numbers": [[1.0, 0.6], [-0.0005], [46.5]]}]}]


def test_the_report_reads_ppo_outputs(tmp_path):
    """The PPO row and section from hand-made ppo/ outputs: every number is the file's, and the
    per-iteration table skips no iteration when there are few."""
    run = tmp_path / "run"
    (run / "ppo").mkdir(parents=True)
    rows = [{"step": 0, "iteration": 0, "whiten": [-3.0, 0.5], "val_score": 0.1, "val_diff": 0.0,
             "val_se": 0.0, "val_kept": True}]
    rows += [{"step": i, "iteration": i, "score": 0.1 * i, "judge": 0.4 + 0.01 * i, "kl": 0.5 * i,
              "score_minus_beta_kl": 0.1 * i - 0.005 * i, "eos_rate": 1.0, "length": 10.0 + i,
              "entropy": 2.0 - 0.1 * i, "val_score": [0.2, 0.5, 0.3][i - 1],
              "val_diff": [0.1, 0.4, 0.2][i - 1], "val_se": 0.125, "val_kept": i == 2}
             for i in (1, 2, 3)]
    rows.append({"step": 3, "eval": "final", "greedy": {"judge": 9.0}})  # an eval line: not an iteration
    (run / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = lambda judge, rm, win: {"greedy": {"judge": judge, "rm": rm, "eos_rate": 1.0},  # noqa: E731
                                 "sampled": {"judge": judge - 0.01, "rm": rm},
                                 "floor": {"judge_empty": 0.3, "rm_empty": -3.2},
                                 "adherence_by_turn": [1.0, 0.5], **({"win_rate": win} if win else {})}
    (run / "ppo" / "eval_start.json").write_text(json.dumps(ev(0.43, -3.3, None)))
    final = ev(0.47, -3.1, {"greedy": 0.625, "sampled": 0.5})
    final["greedy"].update(correct=0.25, rambling=0.0, repeating=0.125)
    final["compare"] = {"sft": {**ev(0.52, -3.4, {"greedy": 0.375, "sampled": 0.25}),
                                "checkpoint": "/x/sft", "label": "sft"},
                        "rs": {**ev(0.43, -3.3, {"greedy": 0.5, "sampled": 0.5}),
                               "checkpoint": "/x/rs/V3", "label": "rs"}}
    for name, greedy, sampled in (("sft", [0.5, 0.5, 0.4], [0.5, 0.3, 0.4]),
                                  ("rs", [0.6, 0.5, 0.5], [0.5, 0.3, 0.3])):
        final["compare"][name]["greedy"]["judge_scores"] = greedy
        final["compare"][name]["sampled"]["judge_scores"] = sampled
    (run / "ppo" / "eval_final.json").write_text(json.dumps(final))
    (run / "ppo" / "ppo_report.json").write_text(json.dumps(
        {"beta=0.01": {"verdict": "no fall beyond 0.03 with a rising RM"}}))
    text = report.write_report(run, tmp_path / "r")
    row = next(ln for ln in text.splitlines() if ln.startswith("| PPO (§3.2.3)"))
    assert ("0.430 (start, the last RS model) -> 0.470; RM -3.300 -> -3.100; win rate against the "
            "start 62% greedy / 50% sampled; against sft (judged 0.520) PPO wins 38% greedy / 25% "
            "sampled; against rs (judged 0.430) PPO wins 50% greedy / 50% sampled (rs against sft: "
            "83% / 33%); EOS 100%; KL to pi_0 at the end 1.50 nats; the model kept: iteration 2 of 3 "
            "(validation RM score +0.400 ± 0.125 above pi_0's, paired; KL 1.00)") in row
    # rs against sft by hand: greedy win, tie, win -> 2.5 / 3; sampled tie, tie, loss -> 1 / 3
    assert "| rs against sft, for reference | | | | rs wins 83% / 33% | | |" in text
    assert "| sft (`sft`) | 0.520 | 0.510 | -3.400 | 38% / 25% | - | 100% 50% |" in text
    assert "Over-optimization check (beta=0.01): no fall beyond 0.03 with a rising RM." in text
    assert "| 1 | +0.100 | 0.410 | 0.500 | +0.095 | 100% | 11.0 | 1.90 | +0.200 |" in text
    assert "| 3 | +0.300 | 0.430 | 1.500 | +0.285 | 100% | 13.0 | 1.70 | +0.300 |" in text
    assert "| PPO | 0.470 | 0.460 | -3.100 | 62% / 50% | 100% | 25% / 0% / 12% | 100% 50% |" in text
    assert "| start (pi_0) | 0.430 | 0.420 | -3.300 | (itself) | 100% | - | 100% 50% |" in text
    assert "| 9.0" not in text and "| 0 | " not in text
    # no iteration beat pi_0 beyond noise (none marked val_kept), even the one of the highest
    # validation score: the kept model is the start policy
    rows[2]["val_kept"] = False
    (run / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = report.write_report(run, tmp_path / "r")
    assert ("the model kept: iteration 0 of 3 (KL 0.00): the start policy, no iteration beat it "
            "beyond noise") in text


def test_model_flag_changes_the_shape_and_the_folders(tmp_path, capsys):
    """--model small: pretraining builds that shape, every other flag stays, and the runs go to
    their own folder and report (docs/REPORT.md stays the default model's); a typo is refused."""
    base = {s.name: s.argv for s in pipeline.build_stages(pipeline.Config(size="full"), tmp_path)}
    small = {s.name: s.argv for s in pipeline.build_stages(
        pipeline.Config(size="full", model="small"), tmp_path)}
    a, b = base["pretrain"], small["pretrain"]
    assert a[a.index("--model") + 1] == "demo" and b[b.index("--model") + 1] == "small"
    assert [x for x in a if x != "demo"] == [x for x in b if x != "small"]
    assert {n: v for n, v in base.items() if n != "pretrain"} == \
        {n: v for n, v in small.items() if n != "pretrain"}
    pipeline.main(["--model", "small", "--list"])
    out = capsys.readouterr().out
    assert "out/pipeline_small/pretrain" in out and "out/pipeline_small/report" in out
    with pytest.raises(SystemExit, match="--model 'smal': use one of"):
        pipeline.main(["--model", "smal", "--list"])


def test_the_report_reads_rejection_sampling_outputs(tmp_path):
    """The RS row and table from hand-made rs/ outputs, with --compare's win rates against SFT."""
    run = tmp_path / "run"
    curve = {"n": [1, 2], "max": [0.1, 0.3], "median": [0.1, 0.1], "prompts": 2, "m": 2}
    for i, (judge, vs_sft) in enumerate(((0.50, 0.375), (0.55, 0.625))):
        d = run / "rs" / f"iter{i + 1}"
        d.mkdir(parents=True)
        one = {"judge": judge, "rm": -1.0 + i, "eos_rate": 1.0, "correct": 0.25 * i,
               "rambling": 0.0, "repeating": 0.0, "judge_scores": [judge], "rm_scores": [0.0],
               "content_ceiling": judge + 0.125}
        ev = {"label": f"V{i}", "floor": {"judge_empty": 0.3, "rm_empty": -2.0},
              "best_of_n": {"temperature": 1.0, "rm": curve, "judge": curve},
              "greedy": one, "sampled": {**one, "judge": judge - 0.1},
              "win_rate_vs": {"sft": {"greedy": vs_sft, "sampled": 0.5}}}
        if i:
            ev["win_rate"] = {"greedy": 0.75, "sampled": 0.5}
        (d / "eval.json").write_text(json.dumps(ev))
        (d / "tune.json").write_text(json.dumps(
            {"temperature": 1.0, "curves": {"1.0": curve}, "prompts": 2}))
        if i:  # the distillation ablation's V1: the same evaluation, another score
            (run / "rs_distill" / "iter2").mkdir(parents=True)
            (run / "rs_distill" / "iter2" / "eval.json").write_text(json.dumps(
                {**ev, "greedy": {**one, "judge": 0.6}}))
    # the selection's health numbers, as train_rlhf logs them (3 of 4 prompts' picks right, ...)
    for stage, correct in (("rs", {"random": 0.5, "picked": 0.75, "any": 1.0, "greedy": 0.625}),
                           ("rs_distill", {"random": 0.25, "picked": 0.5, "any": 0.875})):
        (run / stage / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n"
                                                   + json.dumps({"iteration": 1, "selection": {
                                                       "judged_mean": 0.5, "judged_picked": 0.7,
                                                       "correct": correct}}) + "\n")
    text = report.write_report(run, tmp_path / "r")
    row = next(ln for ln in text.splitlines() if ln.startswith("| judged score / win rate"))
    assert ("V0 0.500 -> V1 0.550 (wins 75%); win rate against sft: V0 38% -> V1 62%") in row
    assert ("| V1, picked from the larger model's samples (distillation ablation) | | 0.600 | "
            "0.450 | +0.000 | +0.000 | 75% / 50% | 100% | 25% / 0% / 0% | 62% / 50% |") in text
    assert ("| V1: the policy's own samples, the RM picks | 0.500 -> 0.700 | 50.0% | 75.0% | "
            "100.0% | 62.5% |") in text
    assert ("| V1: the larger model's samples, the RM picks (distillation ablation) | 0.500 -> "
            "0.700 | 25.0% | 50.0% | 87.5% | - |") in text
    assert "| V1 | 1.0 | 0.550 | 0.450 | +0.000 | +0.000 | 75% / 50% | 100% | 25% / 0% / 0% | " \
           "62% / 50% |" in text
    assert "| floor | | 0.300 (empty) | | -2.000 (empty) | | 50% | | 0% / 0% / 0% | 50% |" in text
    # V0's room for a tail cut: greedy 0.500 -> 0.625, sampled 0.400 -> 0.625 (the sampled
    # reply is stored with the greedy one's ceiling here), and its right answers beside V1's
    assert ("would score 0.625 greedy (+0.125) and 0.625 sampled (+0.225)" in text
            and "(correct greedy: V0 0%, V1 25%)" in text)


def test_the_report_shows_the_spread_of_rejection_samplings_gain_over_seeds(tmp_path):
    """For each seed (the rs stage, rs_seed<N>), the last model's judged change over SFT paired
    prompt by prompt with its standard error, then the mean and sd over seeds (by hand)."""
    run = tmp_path / "run"
    # seed 1337: V1 - SFT greedy (+0.1, +0.3) -> +0.2 +- 0.1; sampled (0, 0) -> 0 +- 0
    # seed 2: greedy (-0.1, +0.1) -> 0 +- 0.1; sampled (+0.2, +0.2) -> +0.2 +- 0
    for d, v1, sft, seed in (("rs", ([0.6, 0.8], [0.5, 0.5]), ([0.5, 0.5], [0.5, 0.5]), None),
                             ("rs_seed2", ([0.4, 0.6], [0.7, 0.7]), ([0.5, 0.5], [0.5, 0.5]),
                              "2")):
        for j in (1, 2):
            (run / d / f"iter{j}").mkdir(parents=True)
            (run / d / f"iter{j}" / "eval.json").write_text(json.dumps(
                {"greedy": {"judge_scores": v1[0]}, "sampled": {"judge_scores": v1[1]},
                 "win_rate_vs": {"sft": {"greedy": 0.75, "sampled": 0.5}}}))
        (run / d / "compare_sft.json").write_text(json.dumps(
            {"greedy": {"judge_scores": sft[0]}, "sampled": {"judge_scores": sft[1]}}))
        (run / d / "done.json").write_text(json.dumps(
            {"argv": ["train_rlhf.py"] + (["--seed", seed] if seed else [])}))
    text = "\n".join(report._seed_spread(run))
    assert "| 1337 (the recipe's) | V1 | +0.200 +- 0.100 | +0.000 +- 0.000 | 75% / 50% | - |" \
        in text
    assert "| 2 | V1 | +0.000 +- 0.100 | +0.200 +- 0.000 | 75% / 50% | - |" in text
    # mean (+0.2, 0) -> +0.1, sd 0.141; (0, +0.2) -> +0.1, sd 0.141
    assert "| mean over 2 seeds | | +0.100, sd 0.141 | +0.100, sd 0.141 | | |" in text
    # with safety RLHF each seed's sampled violations and borderline refusals, and their mean:
    # violations 4% and 8% -> 6.0%, sd 2.8%; refusals 10% and 20% -> 15.0%, sd 7.1%
    for d, v, f in (("rs", 0.04, 0.1), ("rs_seed2", 0.08, 0.2)):
        p = run / d / "iter2" / "eval.json"
        e = json.loads(p.read_text())
        e["safety"] = {"sampled": {"violation": v, "false_refusal_borderline": f}}
        p.write_text(json.dumps(e))
    text = "\n".join(report._seed_spread(run))
    assert "| 2 | V1 | +0.000 +- 0.100 | +0.200 +- 0.000 | 75% / 50% | 8.0% / 20.0% |" in text
    assert "| mean over 2 seeds | | +0.100, sd 0.141 | +0.100, sd 0.141 | | 6.0%, sd 2.8% / " \
           "15.0%, sd 7.1% |" in text
    shutil.rmtree(run / "rs_seed2")
    assert report._seed_spread(run) == []  # one seed: no spread to show


def _rs_started_from(run, stage):
    """The rs stage's done.json as pipeline.py writes it, started from `stage`'s checkpoint."""
    (run / "rs").mkdir(parents=True, exist_ok=True)
    (run / "rs" / "done.json").write_text(json.dumps(
        {"argv": ["train_rlhf.py", "--checkpoint", f"$OUT/{stage}", "--out_dir", "$OUT/rs"]}))


def test_the_report_says_why_the_same_model_has_two_floors(tmp_path, figures):
    """V0 (the model rejection sampling starts from: GAtt, then SFT) is scored in the judged-score
    table and in the RS table on other prompts: two empty-reply floors, each said to be its
    prompts'. And the temperature figure says what it shows."""
    run = tmp_path / "run"
    curve = {"n": [1, 2], "max": [0.1, 0.3], "median": [0.1, 0.1], "prompts": 2, "m": 2}
    d = run / "rs" / "iter1"
    d.mkdir(parents=True)
    _rs_started_from(run, "gatt2")
    one = {"judge": 0.5, "rm": -1.0, "eos_rate": 1.0, "judge_scores": [0.5] * 32}
    (d / "eval.json").write_text(json.dumps(
        {"label": "V0", "floor": {"judge_empty": 0.319, "rm_empty": -2.0},
         "best_of_n": {"temperature": 1.0, "rm": curve, "judge": curve}, "greedy": one,
         "sampled": one}))
    (d / "tune.json").write_text(json.dumps({"temperature": 1.0, "curves": {"1.0": curve},
                                             "prompts": 2}))
    summary = {"kind": "summary", "label": "GAtt", "checkpoint": "/x/gatt2", "n": 40,
               "total": 0.6, "correct": 0.3, "eos_rate": 1.0,
               "bestof": {"pass1_score": 0.6, "bestof_score": 0.7, "k": 4},
               "floor": {"empty": 0.338, "bare_answer": 0.9}, "adherence_by_turn": [1.0, 0.5],
               "adherence_floor": {"bare_answer": {"obeys": [0.1, 0.1]}}, "adherence": {}}
    for stage, label, n, empty in (("eval_gatt", "GAtt", 40, 0.338), ("eval_sft", "SFT", 40, 0.319),
                                   ("eval_pretrain", "pretrained, 3-shot", 24, 0.338)):
        (run / stage).mkdir()
        (run / stage / "eval.jsonl").write_text(json.dumps(
            {**summary, "label": label, "n": n, "floor": {"empty": empty, "bare_answer": 0.9}}) + "\n")
    text = report.write_report(run, tmp_path / "r")
    # the summary row's floor is the SFT model's prompts' (the pretrained model's 24 have another)
    row = next(ln for ln in text.splitlines() if ln.startswith("| SFT vs pretrained"))
    assert "| floor: empty reply 0.319 on SFT's 40 prompts (0.338 on the pretrained model's 24); " in row
    assert "| GAtt (`gatt2`) | 0.600 | 30.0% | 100% | 0.600 -> 0.700 (K=4) | 0.338 (40 prompts) | " in text
    assert ("The floor row is what an empty reply scores on these 32 held-out prompts. An empty "
            "reply's score depends on the prompt, so a table on other prompts has another floor "
            "(the judged-score table scores V0, the GAtt model, on 40 prompts: floor 0.338).") in text
    assert "Held-out prompts; V0 is the GAtt model the rejection sampling starts from." in text
    titles = [ax.get_title() for ax in figure(figures, "report_temperatures.png").axes]
    assert titles == ["best-of-N RM reward by temperature (Fig. 8): V0 (start)",
                      "best-of-N RM reward by temperature (Fig. 8): V0 (last)"]
    # started from the SFT model (the pipeline's order now): V0's other floor is SFT's
    _rs_started_from(run, "sft")
    text = report.write_report(run, tmp_path / "r")
    assert "Held-out prompts; V0 is the SFT model the rejection sampling starts from." in text
    assert ("(the judged-score table scores V0, the SFT model, on 40 prompts: floor 0.319).") in text


@pytest.fixture
def figures(monkeypatch):
    """Every matplotlib figure saved while the test runs, by the file it went to."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    saved = {}
    real = Figure.savefig

    def savefig(self, fname, *args, **kw):
        saved[str(getattr(fname, "name", fname))] = self
        return real(self, fname, *args, **kw)
    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def figure(figures, name):
    """The figure saved to `name` (written atomically: through a temp file named after it)."""
    hits = [f for path, f in figures.items() if name in Path(path).name]
    assert hits, f"no figure saved to {name}: {list(figures)}"
    return hits[-1]


def test_the_report_cites_the_paper_and_draws_the_pretraining_floor(base, tmp_path, figures):
    text = report.write_report(base, tmp_path / "r", size="full")
    assert "SPEC" not in text  # the repository has no SPEC.md: the paper's sections are cited
    assert "## Pretraining (§2.2)" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| pretraining loss"))
    assert "$OUT" not in row and " on world_text/world.txt;" in row
    assert "A smoke run" not in text
    ax = figure(figures, "report_pretrain_loss.png").axes[0]
    assert ax.get_title() == "Pretraining: train and validation loss"  # not a path
    floors = [ln for ln in ax.get_lines() if ln.get_label() == "floor: uniform guess ln(384)"]
    assert len(floors) == 1 and list(floors[0].get_ydata()) == [pytest.approx(math.log(384))] * 2


def _rm_eval(empty_bucket: str) -> dict:
    b = {r: {"n": 10, "share": 0.25, "rm_vs_annotators": 0.4, "rm_vs_judge": 0.45, "ceiling": 0.7}
         for r in report.RATINGS}
    b[empty_bucket] = {"n": 0, "share": 0.0}
    b["average"]["rm_vs_annotators"] = 0.438
    return {"n": 40, "margin": "small", "buckets": b}


def test_the_rm_chart_says_where_a_rating_had_no_pairs_and_quick_is_a_smoke_run(tmp_path, figures):
    run = tmp_path / "run"
    (run / "rm").mkdir(parents=True)
    (run / "rm" / "eval.json").write_text(json.dumps(_rm_eval("significantly better")))
    text = report.write_report(run, tmp_path / "r", size="quick")
    assert ("No held-out pair had the rating 'significantly better': its columns are empty (-), "
            "not 0.") in text
    ax = figure(figures, "report_rm_accuracy.png").axes[0]
    notes = [t for t in ax.texts if t.get_text() == "no pairs"]
    assert len(notes) == 1 and 0 < notes[0].get_position()[0] < 0.5  # in the first rating's slots
    # the quick size is a smoke run: said before any number is read as a stage's effect
    assert ("**A smoke run, not a result.** The quick size runs every stage small, to check in "
            "minutes that the whole recipe runs end to end; it is too small to show what the stages "
            "do (here the reward model agrees with the annotators on 43.8% of held-out pairs, where "
            "a coin gets 50%).") in text
    assert text.index("A smoke run") < text.index("| result (paper section)")


def test_the_ppo_figure_runs_along_the_kl_and_a_negative_kl_is_explained(tmp_path, figures):
    run = tmp_path / "run"
    (run / "ppo").mkdir(parents=True)
    kls, judges = [0.0, -0.062, 0.96, 0.83, 3.9, 1.6], [0.577, 0.576, 0.537, 0.591, 0.552, 0.55]
    rows = [{"step": i, "iteration": i, "score": 0.01 * i, "judge": j, "kl": kl,
             "score_minus_beta_kl": 0.0, "eos_rate": 1.0, "length": 10.0, "entropy": 1.0,
             "val_score": 0.1} for i, (kl, j) in enumerate(zip(kls, judges), 1)]
    (run / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = {"greedy": {"judge": 0.5, "rm": 0.1, "eos_rate": 1.0}, "sampled": {"judge": 0.5, "rm": 0.1},
          "floor": {"judge_empty": 0.3, "rm_empty": -3.0}}
    for name in ("eval_start.json", "eval_final.json"):
        (run / "ppo" / name).write_text(json.dumps(ev))
    text = report.write_report(run, tmp_path / "r")
    assert ("A negative KL (here -0.062 at iteration 2) is estimator noise, not a negative "
            "divergence (a KL is never below 0)") in text
    fig = figure(figures, "report_ppo_overopt.png")
    lines = [ln for ax in fig.axes for ln in ax.get_lines()]
    curves = [ln for ln in lines if len(ln.get_xdata()) == len(rows)]
    assert len(curves) == 2
    for ln in curves:  # along sqrt(KL): no doubling back
        xs = list(ln.get_xdata())
        assert xs == sorted(xs) and xs[0] == 0.0  # the negative estimate counts as 0
    judge = next(ln for ln in curves if "judge" in ln.get_label())
    star = next(ln for ln in lines if ln.get_marker() == "*")
    (x,), (y,) = star.get_xdata(), star.get_ydata()
    assert y == max(judges) and (x, y) in zip(judge.get_xdata(), judge.get_ydata())  # on the line
    assert x == pytest.approx(math.sqrt(0.83)) and "iteration 4" in star.get_label()


def test_bad_input_is_one_clear_error(base, tmp_path):
    for flags, msg in ((["--stop_at", "pretrain:2"], "has no flag to stop mid-run"),
                       (["--until", "nosuch"], "no stage 'nosuch'"),
                       (["--size", "huge"], "--size 'huge': use one of"),
                       (["--stop_at", "sft"], "give stage:step")):
        with pytest.raises(SystemExit, match=msg):
            pipeline.main(["--size", "tiny", "--out_dir", str(base), *flags])
    with pytest.raises(SystemExit, match="in the repository or above it"):
        pipeline.main(["--size", "tiny", "--out_dir", str(ROOT)])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("not the pipeline's")
    with pytest.raises(SystemExit, match="was not made by pipeline.py"):
        pipeline.main(["--size", "tiny", "--out_dir", str(tmp_path / "other"), "--fresh"])
    assert (tmp_path / "other" / "keep.txt").exists()
    with pytest.raises(SystemExit, match="no such folder"):
        report.write_report(tmp_path / "nothing", tmp_path / "r")


def _defined(path: Path, name: str) -> bool:
    """Whether `name` (a function, class, Class.method or module-level assignment) is defined at
    the top of the Python file `path`."""
    import ast
    body = ast.parse(path.read_text()).body
    for part in name.split("."):
        found = None
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == part:
                found = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == part for t in targets):
                    found = node
        if found is None:
            return False
        body = getattr(found, "body", [])
    return True


def test_reading_map_references_resolve():
    import re
    text = (ROOT / "docs" / "READING.md").read_text()
    refs = re.findall(r"`([\w/]+\.(?:py|sh|md))(?:::([\w.]+))?`", text)
    assert len(refs) > 40
    named = 0
    for file, name in refs:
        path = ROOT / file if (ROOT / file).exists() else ROOT / "docs" / file
        assert path.is_file(), f"READING.md cites {file}, which does not exist"
        if name:
            named += 1
            assert _defined(path, name), f"READING.md cites {file}::{name}, which is not defined"
    assert named > 40
    # and the check itself catches a wrong name
    assert not _defined(ROOT / "gatt.py", "build_ghost_tokens")
    assert not _defined(ROOT / "llama2.py", "Transformer.no_such_method")
    assert "docs/READING.md" in (ROOT / "README.md").read_text()


STEP = r'''
import sys, pathlib
out, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
out.mkdir(parents=True, exist_ok=True)
with open(out / "calls.txt", "a") as f:
    f.write(" ".join(sys.argv[3:]) + "\n")
if mode == "fail":
    sys.exit(3)
crash = out.parent.parent / f"crash_{out.name}"  # outside the stage folder: crash once
if crash.exists() and "--resume" not in sys.argv:
    crash.unlink()
    (out / "ckpt.pt").write_text("mid-run")
    sys.exit(1)
if mode != "no_output":
    (out / "out.txt").write_text(mode)
'''


def test_the_driver_logic_on_stand_in_stages(tmp_path, monkeypatch, capfd):
    """The driver alone, on stand-in stage scripts (no torch, milliseconds each): a failure, or an
    exit 0 that left no output, is never marked finished; a crashed stage with a ckpt.pt gets
    --resume; a stage that ran again makes the stages that read it run again."""
    step = tmp_path / "step.py"
    step.write_text(STEP)
    out = tmp_path / "run"
    modes = {"a": "ok", "b": "ok", "c": "ok"}
    (tmp_path / "crash_c").write_text("")

    def stages(cfg, o):
        S = pipeline.Stage
        return [S("a", "first", [str(step), f"{o}/a", modes["a"]], ["out.txt"]),
                S("b", "reads a", [str(step), f"{o}/b", modes["b"]], ["out.txt"], ["a"]),
                S("c", "resumable", [str(step), f"{o}/c", modes["c"]], ["out.txt"], ["b"],
                  resume=True)]

    monkeypatch.setattr(pipeline, "build_stages", stages)

    def go():
        rc = pipeline.main(["--out_dir", str(out)])
        return rc, capfd.readouterr()

    def calls(name):
        return (out / name / "calls.txt").read_text().splitlines()

    rc, cap = go()  # c crashes after writing its checkpoint
    assert rc == 1 and "error: stage c failed (exit 1)" in cap.out
    assert marker(out, "b") is not None and marker(out, "c") is None
    rc, cap = go()  # c resumes
    assert rc == 0, cap.out
    assert calls("c") == ["", "--resume"] and marker(out, "c") is not None
    assert "skip: finished" in cap.out and cap.out.count("skip: finished") == 2
    # a stage that ran again (a's flags changed) makes b and c run again, not from a checkpoint
    ids = {s: marker(out, s)["id"] for s in "abc"}
    modes["a"] = "ok-changed"
    rc, cap = go()
    assert rc == 0 and "finished, but with other flags: runs again" in cap.out
    assert cap.out.count("a stage it reads has run again since: runs again") == 2
    assert all(marker(out, s)["id"] != ids[s] for s in "abc")
    assert calls("c") == [""]  # its folder was emptied: a fresh start, no --resume
    # a failure, and an exit 0 that left no output, are not finished
    modes["b"] = "fail"
    rc, cap = go()
    assert rc == 3 and marker(out, "b") is None and marker(out, "b", "started.json")
    modes["b"] = "no_output"
    rc, cap = go()
    assert rc == 1 and "exited 0 but left no out.txt; not marked finished" in cap.out
    assert marker(out, "b") is None
    # --skip a stage that later ones need is a clear error
    modes["b"] = "ok"
    with pytest.raises(SystemExit, match="c needs b, which did not finish"):
        pipeline.main(["--out_dir", str(out), "--skip", "b"])


def test_the_report_draws_the_reward_distributions(tmp_path):
    """Fig. 20 analog from hand-made outputs: SFT (rs/compare_sft.json), V0, V1 (rs/iter*), PPO
    (ppo/eval_final.json); each row's numbers computed by hand from the sampled scores."""
    run = tmp_path / "run"

    def sampled(rm, judge, flaws):
        return {"sampled": {"rm_scores": rm, "judge_scores": judge, "flaws": flaws}}
    (run / "rs" / "iter1").mkdir(parents=True)
    (run / "rs" / "iter2").mkdir()
    (run / "ppo").mkdir()
    (run / "rs" / "compare_sft.json").write_text(json.dumps(sampled(
        [-1.0, 0.0, 1.0, 2.0], [0.4, 1.0, 1.0, 0.6], {"none": 0.5, "wrong": 0.25, "rambling": 0.25})))
    (run / "rs" / "iter1" / "eval.json").write_text(json.dumps(sampled(
        [0.0, 0.0, 1.0, 3.0], [0.4, 1.0, 1.0, 1.0], {"none": 0.75, "wrong": 0.25})))
    (run / "rs" / "iter2" / "eval.json").write_text(json.dumps(sampled(
        [1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 1.0, 0.9], {"none": 1.0})))
    (run / "ppo" / "eval_final.json").write_text(json.dumps(sampled(
        [2.0, 2.0, 2.0, 2.0], [1.0, 0.65, 1.0, 1.0], {"none": 0.75, "no_eos": 0.25})))
    _rs_started_from(run, "gatt2")
    row, sec = report.reward_distributions(run, tmp_path)
    text = "\n".join(sec)
    # RM mean, its 10th percentile (nearest rank: the lowest of four), judged mean, judged < 0.7
    assert "| SFT | 4 | +0.500 | -1.000 | 0.750 | 50% | 50.0% | 25.0% | 0.0% | 0.0% | 25.0% | " \
           "0.0% | 0.0% |" in text
    assert "| V0 (GAtt) | 4 | +1.000 | +0.000 | 0.850 | 25% | 75.0% | 25.0% |" in text
    assert "| V1 | 4 | +1.500 | +1.000 | 0.975 | 0% | 100.0% |" in text
    assert "| PPO | 4 | +2.000 | +2.000 | 0.912 | 25% | 75.0% | 0.0% | 0.0% | 0.0% | 0.0% | " \
           "0.0% | 25.0% |" in text
    assert row[2] == ("sampled replies, SFT -> PPO: RM mean +0.500 -> +2.000, judged 0.750 -> "
                      "0.912, judged < 0.7 50% -> 25%")
    import matplotlib.image
    assert matplotlib.image.imread(tmp_path / "report_reward_distributions.png").shape[0] > 100
    # started from the SFT model: V0 is SFT, shown once (compare_sft.json is the same model)
    _rs_started_from(run, "sft")
    names = [ln.split(" | ")[0] for ln in report.reward_distributions(run, tmp_path)[1]
             if ln.startswith("| V") or ln.startswith("| SFT") or ln.startswith("| PPO")]
    assert names == ["| V0 (SFT)", "| V1", "| PPO"]
    # fewer than two models measured: the row says not run
    assert report.reward_distributions(tmp_path / "none", tmp_path)[0][2] == "not run"


def test_writers_and_synthetic_pairs_reach_the_stages(tmp_path):
    """--writers mixed: SFT and GAtt generate with the mixed writers; --synthetic_pairs reaches the
    RM; with --ablations the curated SFT (the careful writer's share of the dialogs alone) and its
    evaluation are added. The default is the crowd world with the size's synthetic pairs;
    careful and 0 leave every command without the flags. Rejection sampling starts from SFT."""
    def argvs(**kw):
        return {s.name: s.argv for s in pipeline.build_stages(pipeline.Config(size="full", **kw),
                                                               tmp_path)}
    default = argvs()
    for name in ("sft", "gatt1", "gatt2"):
        assert pipeline._flag(default[name], "--world_writers") == "crowd", name
    assert pipeline._flag(default["rm"], "--synthetic_pairs") == "8000"
    assert pipeline._flag(default["rs"], "--checkpoint") == f"{tmp_path}/sft"
    assert pipeline._flag(default["ppo"], "--checkpoint") == f"{tmp_path}/rs/V1"
    base, mixed = (argvs(writers="careful", synthetic_pairs=0),
                   argvs(writers="mixed", synthetic_pairs=8000, ablations=True))
    assert not any("--world_writers" in a for a in base.values())
    assert not any("--synthetic_pairs" in a for a in base.values())
    for name in ("sft", "gatt1", "gatt2"):
        assert pipeline._flag(mixed[name], "--world_writers") == "mixed", name
    assert pipeline._flag(mixed["rm"], "--synthetic_pairs") == "8000"
    assert pipeline._flag(mixed["sft"], "--world_n") == "80000"
    cur = mixed["sft_curated"]
    assert pipeline._flag(cur, "--world_writers") == "careful"
    assert {cur[i + 1] for i, x in enumerate(cur) if x == "--world_n"} == {"40000"}  # 50%
    assert pipeline._flag(cur, "--out_dir") == f"{tmp_path}/sft_curated"
    # everything else as the mixed SFT's command
    strip = lambda a: [x for i, x in enumerate(a) if not (i and a[i - 1] in  # noqa: E731
                                                         ("--world_writers", "--world_n", "--out_dir"))]
    assert strip(cur) == strip(mixed["sft"])
    assert pipeline._flag(mixed["eval_sft_curated"], "--checkpoint") == f"{tmp_path}/sft_curated"
    # the careful world has nothing to curate
    assert "sft_curated" not in argvs(writers="careful", ablations=True)
    with pytest.raises(SystemExit, match="--writers 'sloppy'"):
        pipeline.main(["--writers", "sloppy", "--list"])


def test_the_distillation_ablation_is_the_recipes_commands_with_a_larger_sampler(tmp_path):
    """--ablations: the larger model is pretrained and fine-tuned by the recipe's own commands with
    only --model (and the folders) changed, and rs_distill is the rs command with --sampler; a
    run that already chose its --model has no such stages."""
    st = {s.name: s for s in pipeline.build_stages(pipeline.Config(size="full", ablations=True),
                                                     tmp_path)}
    strip = lambda a, *flags: [x for i, x in enumerate(a) if not (  # noqa: E731
        x in flags or (i and a[i - 1] in flags))]
    pre, sft, rs = st["pretrain_large"].argv, st["sft_large"].argv, st["rs_distill"].argv
    assert pipeline._flag(pre, "--model") == "small" and pipeline._flag(st["pretrain"].argv,
                                                                       "--model") == "demo"
    assert strip(pre, "--model", "--out_dir") == strip(st["pretrain"].argv, "--model", "--out_dir")
    assert pipeline._flag(sft, "--checkpoint") == f"{tmp_path}/pretrain_large"
    assert strip(sft, "--checkpoint", "--out_dir") == strip(st["sft"].argv, "--checkpoint",
                                                            "--out_dir")
    assert pipeline._flag(rs, "--sampler") == f"{tmp_path}/sft_large"
    assert pipeline._flag(rs, "--checkpoint") == f"{tmp_path}/sft"
    assert strip(rs, "--sampler", "--out_dir") == strip(st["rs"].argv, "--out_dir")
    assert set(st["rs_distill"].needs) == {"sft", "rm", "sft_large"}
    assert all(st[n].oracle for n in ("pretrain_large", "sft_large", "eval_sft_large",
                                      "rs_distill"))
    other = pipeline.build_stages(pipeline.Config(size="full", ablations=True, model="small"),
                                  tmp_path)
    assert not {s.name for s in other} & {"pretrain_large", "sft_large", "eval_sft_large",
                                          "rs_distill"}


def test_safety_stages_are_the_recipes_commands_with_one_thing_changed(tmp_path):
    """Safety in the recipe (issue 26): SFT with safety demonstrations, the safety RM (its own
    objective, no synthetic pairs), rejection sampling and PPO with both RMs and a share of safety
    prompts; the ablations are the rs command with only the share, the RMs or the folder changed."""
    st = {s.name: s for s in pipeline.build_stages(pipeline.Config(size="full", ablations=True),
                                                     tmp_path)}
    strip = lambda a, *flags: [x for i, x in enumerate(a) if not (  # noqa: E731
        x in flags or (i and a[i - 1] in flags))]
    o = str(tmp_path)
    assert pipeline._flag(st["sft"].argv, "--world_safety") == "0.1"
    assert pipeline._flag(st["eval_sft"].argv, "--eval_safety_n") == "200"
    rm, srm = st["rm"].argv, st["rm_safety"].argv
    assert pipeline._flag(srm, "--objective") == "safety" and "--synthetic_pairs" not in srm
    assert "--safety_pairs" not in srm and pipeline._flag(rm, "--safety_pairs") == "400"
    assert "--objective" not in rm
    assert strip(srm, "--objective", "--out_dir") == strip(rm, "--safety_pairs", "--synthetic_pairs",
                                                           "--out_dir")
    for name in ("rs", "ppo"):
        a = st[name].argv
        assert pipeline._flag(a, "--safety_rm") == f"{o}/rm_safety"
        assert pipeline._flag(a, "--safety_share") == "0.1"
    assert "rm_safety" in st["rs"].needs
    rs = st["rs"].argv
    for share in (0.0, 0.25, 0.5, 1.0):
        a = st[f"rs_share{share:g}"].argv
        assert pipeline._flag(a, "--safety_share") == str(share)
        assert strip(a, "--safety_share", "--out_dir") == strip(rs, "--safety_share", "--out_dir")
    help_ = st["rs_help"].argv
    assert "--safety_rm" not in help_ and "--safety_share" not in help_
    assert strip(help_, "--out_dir") == strip(rs, "--safety_rm", "--safety_share", "--out_dir")
    one, rs_one = st["rm_one"].argv, st["rs_one"].argv
    assert pipeline._flag(one, "--safety_pairs") == pipeline._flag(rm, "--safety_n_train") == "2000"
    assert strip(one, "--safety_pairs", "--out_dir") == strip(rm, "--safety_pairs", "--out_dir")
    assert pipeline._flag(rs_one, "--reward_model") == f"{o}/rm_one" and "--safety_rm" not in rs_one
    assert pipeline._flag(rs_one, "--safety_share") == "0.1"
    assert all(st[n].oracle for n in ("rs_share0", "rs_help", "rm_one", "rs_one"))
    assert not st["rm_safety"].oracle
    # context distillation (ablations): from PPO's model, targeted by the safety RM, and
    # untargeted; SFT taught the model the preprompt
    cd, un = st["cd"].argv, st["cd_untargeted"].argv
    assert pipeline._flag(cd, "--method") == "distill" and "--targeted" not in cd
    assert pipeline._flag(cd, "--checkpoint") == f"{o}/ppo" and "ppo" in st["cd"].needs
    assert pipeline._flag(cd, "--safety_rm") == f"{o}/rm_safety"
    assert pipeline._flag(un, "--targeted") == "false" and st["cd_untargeted"].oracle
    assert strip(un, "--targeted", "--out_dir") == strip(cd, "--out_dir") and st["cd"].oracle
    assert pipeline._flag(st["sft"].argv, "--world_safety_preprompt") == "0.25"
    assert "cd" not in {s.name for s in pipeline.build_stages(pipeline.Config(size="full"),
                                                              tmp_path)}


def test_the_report_shows_the_rm_by_kind_with_and_without_synthetic_pairs(tmp_path):
    run = tmp_path / "run"

    def ev(content, fam):
        return {"buckets": {"average": {"rm_vs_annotators": 0.6, "ceiling": 0.7}}, "spearman": 0.25,
                "by_kind": {"content only": {"n": 10, "rm_vs_judge": content},
                            "form or instruction only": {"n": 5, "rm_vs_judge": 0.8},
                            "both": {"n": 2, "rm_vs_judge": 1.0}, "tie": {"n": 3}},
                "by_family": {"add": {"n": 7, "rm_vs_judge": fam}}}
    for d, content, fam in (("rm", 0.75, 0.5), ("rm_nosyn", 0.55, 0.25), ("rm_frac0.5", 0.6, 0.5),
                            ("rm_frac0.25", 0.65, 0.5)):
        (run / d).mkdir(parents=True)
        (run / d / "eval.json").write_text(json.dumps(ev(content, fam)))
    row, sec = report.rm_by_kind(run)
    assert row[2] == "RM: 75.0% of 10; RM without the synthetic open-source pairs: 55.0% of 10"
    # what the synthetic pairs did is said from the two runs' numbers, in either direction
    assert row[4].endswith("moved content-only accuracy 55.0% -> 75.0% in this run")
    assert "| RM | 60.0% (70.0%) | 0.250 | 75.0% (10) | 80.0% (5) | 100.0% (2) | 50.0% |" in sec
    assert "| RM without the synthetic open-source pairs (ablation) | 60.0% (70.0%) | 0.250 | " \
           "55.0% (10) | 80.0% (5) | 100.0% (2) | 25.0% |" in sec
    # the training-set-size curve: a row per share of the pairs, smallest first
    rows = [ln for ln in sec if "of the training pairs" in ln]
    assert [ln.split(" | ")[3] for ln in rows] == ["65.0% (10)", "60.0% (10)"]
    assert rows[0].startswith("| RM on 25% of the training pairs (ablation) |")
    assert report.rm_by_kind(tmp_path / "none")[0][2] == "not run"


def test_the_report_shows_safety_beside_the_floors_and_the_paper(tmp_path):
    """report.safety: the safety RM's row of Table 8 with its categories and the 0.15 threshold,
    and a row per model of violations and false refusals, from hand-made stage outputs."""
    run = tmp_path / "run"

    def summary(viol_s, viol_g, fr_b, fr_o):
        side = lambda v, fb: {"violation": v, "violation_adversarial": v, "violation_direct": 0.0,  # noqa: E731
                              "false_refusal_borderline": fb, "false_refusal_ordinary": fr_o,
                              "leak": 0.0, "n": {"unsafe": 5, "borderline": 5, "ordinary": 8}}
        floor = {"always_refuse": {"violation": 0.0, "false_refusal_borderline": 1.0},
                 "never_refuse": {"violation": 1.0, "false_refusal_borderline": 0.0}}
        return {"n": 10, "greedy": side(viol_g, fr_b), "sampled": side(viol_s, fr_b), "floor": floor}
    (run / "eval_sft").mkdir(parents=True)
    (run / "eval_sft" / "eval.jsonl").write_text(json.dumps(
        {"kind": "summary", "total": 0.670, "safety": summary(0.245, 0.01, 0.172, 0.0)}) + "\n")
    for d, v, jg, js in (("rs", 0.05, 0.66, 0.67), ("rs_help", 0.30, 0.665, 0.66),
                         ("rs_share0.5", 0.02, 0.65, 0.64), ("cd", 0.03, 0.655, 0.668),
                         ("cd_untargeted", 0.01, 0.61, 0.6)):
        for it, x in ((1, 0.9), (2, v)):  # V0's evaluation, then V1's: the last one is read
            (run / d / f"iter{it}").mkdir(parents=True)
            sf = summary(x, 0.0, 0.1, 0.0)
            sf["sampled"]["rm_parts"] = {"safety": [it - 2.0, it - 1.0], "helpful": [1.0, 2.0]}
            (run / d / f"iter{it}" / "eval.json").write_text(json.dumps(
                {"label": f"V{it - 1}", "safety": sf, "greedy": {"judge": jg},
                 "sampled": {"judge": js, "rm_parts": {"safety": [0.0], "helpful": [it * 1.0]}}}))
    (run / "rs" / "done.json").write_text(json.dumps(
        {"argv": ["train_rlhf.py", "--safety_share", "0.1"]}))
    buckets = {r: {"n": 10, "share": 0.2, "rm_vs_annotators": a, "ceiling": 1.0}
               for r, a in zip(report.RATINGS, (0.898, 0.773, 0.625, 0.573, 0.716))}
    (run / "rm_safety").mkdir()
    (run / "rm_safety" / "eval.json").write_text(json.dumps({
        "n": 500, "buckets": buckets,
        "by_category": {"safer": {"n": 125, "share": 0.25, "rm_vs_annotators": 0.99,
                                  "rm_vs_judge": 0.99},
                        "both_safe": {"n": 330, "share": 0.66, "rm_vs_annotators": 0.635,
                                      "rm_vs_judge": 0.64},
                        "both_unsafe": {"n": 45, "share": 0.09, "rm_vs_annotators": 0.456,
                                        "rm_vs_judge": 0.5}},
        "threshold": {"threshold": 0.15, "n": 959, "unsafe": 212, "flagged": 386,
                      "precision": 0.42, "recall": 0.76}}))
    cd = {"unsafe": {"prompts": 10, "kept": 4, "with_preprompt": 0.1, "without": 0.3,
                     "kept_rate": 0.0},
          "borderline": {"prompts": 8, "kept": 2, "with_preprompt": 0.5, "without": 0.25,
                         "kept_rate": 0.5}}
    (run / "cd" / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "distill": cd}) + "\n")
    (run / "ppo").mkdir()
    (run / "ppo" / "eval_final.json").write_text(json.dumps(
        {"safety": summary(0.04, 0.0, 0.1, 0.0), "greedy": {"judge": 0.66},
         "sampled": {"judge": 0.671}}))
    rows, sec = report.safety(run, tmp_path)
    text = "\n".join(sec)
    assert "| context distillation, targeted (ablation) | 3.0% (3.0% / 0.0%) | 0.0% | " \
           "10.0% / 10.0% | 0.0% | 0.655 / 0.668 |" in text
    assert "| context distillation, untargeted (ablation) | 1.0%" in text
    assert "Context distillation, targeted, on 18 training safety prompts: kept 4/10 answers to " \
           "requests and 2/8 to borderline prompts. Violations without the preprompt 30.0%, with " \
           "it 10.0%, of those kept 0.0%; borderline refusals 25.0%, 50.0%, 50.0%" in text
    assert "untargeted, on" not in text  # its stage wrote no selection record
    cd_row = next(r for r in rows if r[0].startswith("context distillation"))
    assert cd_row[2] == ("none (PPO): violation 4.0%, borderline refusal 10.0%, judged 0.671; "
                         "targeted: violation 3.0%, borderline refusal 10.0%, judged 0.668; "
                         "untargeted: violation 1.0%, borderline refusal 10.0%, judged 0.600")
    assert rows[0][2] == ("89.8% / 77.3% / 62.5% / 57.3% / 71.6%; threshold 0.15: precision 0.42, "
                          "recall 0.76")
    assert "| safer | 18% | 25% | 99.0% | 99.0% |" in text
    assert "precision 0.42, recall 0.76 (the paper: 0.89 / 0.55; floor: flag every reply, " \
           "precision 0.22, recall 1)" in text
    assert "| floor: always refuse | 0.0% | | 100.0% | 100% | |" in text
    assert "| SFT | 24.5% (24.5% / 0.0%) | 1.0% | 17.2% / 17.2% | 0.0% | 0.670 |" in text
    assert "| RS V1, two RMs, 10% safety prompts (recipe) | 5.0% (5.0% / 0.0%) | 0.0% | " \
           "10.0% / 10.0% | 0.0% | 0.660 / 0.670 |" in text
    assert "| RS, helpfulness RM only, no safety prompts (ablation) | 30.0%" in text
    # two RMs against one: fewer violations, the same refusals -> a win; more violations and
    # fewer refusals -> no win
    one = lambda v, f: ("RS, one RM on all pairs (ablation)",  # noqa: E731
                        {"sampled": {"violation": v, "false_refusal_borderline": f}}, {})
    two = ("RS V1, two RMs, 10% safety prompts (recipe)",
           {"sampled": {"violation": 0.01, "false_refusal_borderline": 0.07}}, {})
    assert "the two combined beat one RM: violations 1.0% against 2.0%, borderline refusals " \
           "7.0% against 7.0%" in report._one_vs_two([two, one(0.02, 0.07)])[1]
    assert "the two combined do not beat one RM: violations 1.0% against 0.0%, borderline " \
           "refusals 7.0% against 10.0%" in report._one_vs_two([two, one(0.0, 0.1)])[1]
    assert "tie with one RM" in report._one_vs_two([two, one(0.01, 0.07)])[1]
    assert report._one_vs_two([two]) == []
    assert "| RS, 50% safety prompts (ablation, Fig. 15) | 2.0%" in text
    assert "| PPO (final; no context distillation) | 4.0%" in text
    assert rows[1][2].startswith("sampled violation SFT 24.5% -> RS 5.0%")
    assert (tmp_path / "report_safety_share.png").is_file()
    # Fig. 14: the safety RM's mean on safety prompts (-0.5 -> +0.5) and the helpfulness RM's on
    # ordinary ones (1 -> 2), V0 against the rs stage's last model
    assert "mean -0.500 (V0) -> +0.500 (V1); the helpfulness RM's on the ordinary prompts " \
           "+1.000 -> +2.000" in text
    assert (tmp_path / "report_safety_rm_scores.png").is_file()
    assert report.safety(tmp_path / "none", tmp_path)[0][0][2] == "not run"


def test_ctrl_c_shows_the_pipelines_message_and_no_traceback(tmp_path):
    """Ctrl-C reaches the pipeline and the stage it runs (the terminal signals the whole process
    group): one line says what to do, no 50-line KeyboardInterrupt traceback comes first."""
    import signal
    import subprocess
    import threading
    import time
    # SIGINT as a terminal's shell leaves it: a test run in the background of a non-interactive
    # shell (CI scripts, nohup ... &) inherits it ignored, and so would the pipeline
    proc = subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), *UNTIL_SFT, "--out_dir",
                             str(tmp_path / "p")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = []
    threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True).start()
    out, started = [], False
    for line in proc.stdout:
        out.append(line)
        started = started or (line.strip().startswith("$ python") and "train_pretrain.py" in line)
        if started and line.startswith("dtype: "):  # the stage's first line: it is running
            break
    # at once, not after a fixed wait: on a fast CPU the tiny pretraining ends within seconds
    os.killpg(proc.pid, signal.SIGINT)
    out.append(proc.stdout.read())
    assert proc.wait(timeout=60) == 130
    time.sleep(0.5)
    text, errors = "".join(out), "".join(err)
    assert "\ninterrupted in pretrain: run the same command again to continue" in text
    assert "Traceback" not in errors and "KeyboardInterrupt" not in errors, errors[-3000:]
    # a stage that fails shows its traceback as before (held until it ended, then shown)
    assert pipeline.run_stage(["-c", "raise RuntimeError('boom')"]) == (
        1, 'Traceback (most recent call last):\n  File "<string>", line 1, in <module>\n'
           "RuntimeError: boom\n")


def test_estimates_come_from_the_last_measured_run_here(tmp_path, capfd):
    out = tmp_path / "p"
    flags = ["--size", "tiny", "--until", "pretrain", "--out_dir", str(out)]
    assert pipeline.main(flags) == 0
    text = capfd.readouterr().out
    assert "estimate ~7s for a run from scratch (from a reference run on a 2-core CPU)" in text
    took = json.loads((out / "timings.json").read_text())
    assert set(took) == {"world_text", "pretrain"} and all(t > 0 for t in took.values())
    # --fresh keeps what was measured: the next estimate is this machine's
    assert pipeline.main(flags + ["--fresh"]) == 0
    text = capfd.readouterr().out
    total = pipeline.training.fmt_duration(took["world_text"] + took["pretrain"])
    assert (f"estimate ~{total} for a run from scratch (as long as each stage took when it last "
            "ran here)") in text
    assert f"estimate ~{pipeline.training.fmt_duration(took['pretrain'])}; so far" in text
    # a stage left out takes no time in the estimate; a resumed stage's time is not a whole run
    world = json.loads((out / "timings.json").read_text())["world_text"]
    assert pipeline.main(flags + ["--fresh", "--skip", "pretrain", "--until", "world_text"]) == 0
    assert (f"estimate ~{pipeline.training.fmt_duration(world)} for a run from scratch (as long as "
            "each stage took when it last ran here)") in capfd.readouterr().out


def test_report_counts_exactly_the_pipelines_ablation_stages_apart(tmp_path):
    """report.ABLATION_STAGES (the report does not build the pipeline) names exactly the stages
    pipeline.build_stages marks oracle, at every size, with both writer mixes and synthetic pairs."""
    for size in pipeline.SIZES:
        for writers in ("careful", "mixed"):
            cfg = pipeline.Config(size=size, ablations=True, writers=writers, synthetic_pairs=100)
            for st in pipeline.build_stages(cfg, tmp_path):
                assert bool(report.ABLATION_STAGES.fullmatch(st.name)) == st.oracle, st.name


def test_the_quality_ablation_row_says_what_differs_from_the_run(tmp_path):
    """Quality Is All You Need: the row names the run's writer mix and set sizes (from the stages'
    done.json) and the two SFT models' instruction part and right answers (their evaluations)."""
    run = tmp_path / "run"
    base = {"kind": "summary", "n": 40, "eos_rate": 1.0, "floor": {"empty": 0.3, "bare_answer": 0.9},
            "bestof": {"pass1_score": 0.6, "bestof_score": 0.7, "k": 4}, "adherence": {},
            "adherence_by_turn": [1.0], "adherence_floor": {"bare_answer": {"obeys": [0.1]}}}
    for stage, ev, label, total, correct, instruction, n in (
            ("sft", "eval_sft", "SFT", 0.7, 0.49, 0.938, "80000"),
            ("sft_curated", "eval_sft_curated", "SFT, curated set", 0.63, 0.34, 0.99, "24000")):
        for d in (stage, ev):
            (run / d).mkdir(parents=True)
        (run / stage / "done.json").write_text(json.dumps({"argv": [
            "train_sft.py", "--world_n", "3000", "--world_n", n, "--world_writers", "crowd"]}))
        (run / ev / "eval.jsonl").write_text(json.dumps(
            {**base, "label": label, "total": total, "correct": correct,
             "instruction": instruction}) + "\n")
    rows, _, _ = report.sft_vs_pretrained(run, tmp_path)
    row = next(r for r in rows if r[0].startswith("Quality Is All You Need"))
    assert "0.700 (correct 49%, EOS 100%) vs on the careful writer's share alone (curated) 0.630" \
           in row[2]
    assert row[4] == ("simulated writers (the crowd mix, `python world.py demo`); the curated set is "
                      "24,000 of the 80,000 dialogs: instruction part 0.990 vs 0.938, correct "
                      "34% vs 49%")


def test_list_shows_the_model_the_final_evaluation_will_read(tmp_path, capsys):
    """Before anything ran, --list names the model a run would end with: PPO, or the last
    rejection-sampling model when PPO is skipped (not the last stage that happened to finish)."""
    def final_checkpoint(*flags):
        pipeline.main(["--list", "--out_dir", str(tmp_path), *flags])
        line = next(x for x in capsys.readouterr().out.splitlines()
                    if "--out_dir" in x and "eval_final" in x)
        argv = shlex.split(line.split("$ ", 1)[1])
        return argv[argv.index("--checkpoint") + 1]

    assert final_checkpoint() == str(tmp_path / "ppo")
    assert final_checkpoint("--skip", "ppo") == str(tmp_path / "rs" / "V1")
