"""Which run is best? evaluate.py scores the base, two adapters and an export on the same problems in one command,
each against the base with its interval and p-value; every checkpoint of a run is scored and the best named;
train.py --score-checkpoints scores them as it saves and keeps the best-scoring one."""

import json
from pathlib import Path

import pytest

from pipeline import folders, monitoring

import evaluate
import train
from conftest import train_argv

pytestmark = pytest.mark.slow  # the demo's whole fine-tune


@pytest.fixture(scope="module")
def second_run(demo_trained, tmp_path_factory) -> Path:
    """Another run on the demo's data: rank 8, 20 steps, a checkpoint every 10, each scored as it is saved; in fp32,
    the dtype evaluate.py computes in on a CPU."""
    out = tmp_path_factory.mktemp("r8") / "checkpoints"
    assert train.main(train_argv(demo_trained["model"], demo_trained["prepared"], out, "--score-checkpoints",
                                 "--cpu-dtype", "float32",
                                 max_steps=20, save_steps=10, keep_last=3, batch_size=8, lora_r=8, lr="3e-3",
                                 score_max_new_tokens=64)) == 0
    return out


def test_one_command_compares_the_base_two_adapters_and_an_export(demo_trained, second_run, exported, tmp_path,
                                                                  capsys):
    out = tmp_path / "results"
    assert evaluate.main(["--model", str(demo_trained["model"]), "--data", str(demo_trained["prepared"]),
                          "--compare-base", "--adapter", str(demo_trained["adapter"]), "--adapter",
                          str(second_run / folders.FINAL_ADAPTER), "--merged", str(exported),
                          "--max-new-tokens", "40", "--out", str(out)]) == 0  # the family's answers take ~15
    printed = capsys.readouterr().out
    summary = json.loads((out / folders.SUMMARY).read_text(encoding="utf-8"))
    first = demo_trained["adapter"].parent.parent.name  # two final/ folders: named by the folder that tells them apart
    labels = ["base", f"{first}/fine-tuned", "r80/fine-tuned", "export"]
    assert list(summary["models"]) == labels and summary["reference"] == "base"
    assert all(model["problems"] == 22 for model in summary["models"].values())
    for label in labels[1:]:  # each against the base: difference, interval, p-value, the verdict on screen
        comparison = summary["comparisons"][label]
        low, high = comparison["interval"]
        assert low <= comparison["difference"] <= high and 0 <= comparison["p_value"] <= 1
        assert comparison["verdict"].startswith(f"{label} vs base: ") and comparison["verdict"] in printed
    # The export is the model that was scored: the same verdict on every problem as its adapter.
    tuned, merged = summary["models"][labels[1]]["per_problem"], summary["models"]["export"]["per_problem"]
    assert tuned == merged and summary["models"]["export"]["pass@1"] >= 0.4
    # Which model solved which: on screen where they differ, every problem in comparison.md.
    assert "| problem | base | " + " | ".join(labels[1:]) + " |" in printed
    table = (out / evaluate.TABLE_NAME).read_text(encoding="utf-8")
    assert table.count("\n| ") >= 4 + 22 and "95% interval" in table
    written = {"base.jsonl", f"{first}__fine-tuned.jsonl", "r80__fine-tuned.jsonl", "export.jsonl"}
    assert {path.name for path in out.glob("*.jsonl")} == written
    assert all(name in printed.splitlines()[-1] for name in written)  # the files named as they are written


def test_every_checkpoint_is_scored_beside_the_loss_and_the_best_named(second_run, demo_trained, tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import checkpoint_manager

    out = tmp_path / "scores"
    assert evaluate.main(["--checkpoints", str(second_run), "--model", str(demo_trained["model"]), "--data",
                          str(demo_trained["prepared"]), "--max-new-tokens", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / folders.SUMMARY).read_text(encoding="utf-8"))
    # checkpoint-20 holds final/'s weights: scored once, as the fine-tuned model
    assert summary["checkpoints"]["steps"] == {"checkpoint-10": 10, "fine-tuned": 20}
    best = summary["checkpoints"]["best"]
    assert summary["models"][best]["pass@1"] == max(m["pass@1"] for m in summary["models"].values())
    assert f"best checkpoint by pass@1: {best}" in printed and (out / evaluate.CHECKPOINTS_PLOT).stat().st_size > 0
    # how sure the pick is: against the runner-up, and every checkpoint compared with the best, not the first
    runner_up = summary["checkpoints"]["runner_up"]
    alike = summary["models"][runner_up]["pass@1"] == summary["models"][best]["pass@1"]
    assert runner_up != best and ("score alike on these problems" if alike
                                  else f"against the runner-up, {runner_up} (step") in printed
    assert summary["reference"] == best and set(summary["comparisons"]) == {runner_up}
    # The scores train.py logged as it saved are the scores evaluate.py gives the same checkpoints.
    history = json.loads((second_run / monitoring.METRICS).read_text(encoding="utf-8"))["history"]
    logged = {row["step"]: row["eval_pass@1"] for row in history if "eval_pass@1" in row}
    assert logged == {10: pytest.approx(summary["models"]["checkpoint-10"]["pass@1"], abs=1e-4),
                      20: pytest.approx(summary["models"]["fine-tuned"]["pass@1"], abs=1e-4)}
    final_settings = second_run / folders.FINAL_ADAPTER / folders.TRAINING_SETTINGS
    final = json.loads(final_settings.read_text(encoding="utf-8"))["result"]
    assert final["eval_pass@1"] == logged[20]
    # checkpoint_manager: by the evaluation's scores, and by the training's own
    assert checkpoint_manager.main(["--run", str(second_run), "best", "--scores", str(out)]) == 0
    folder = folders.FINAL_ADAPTER if best == "fine-tuned" else best  # named by its folder
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("best by held-out pass@1: ") and line.split(" (step")[0].endswith(f"/{folder}")
    assert checkpoint_manager.main(["--run", str(second_run), "best"]) == 0
    assert "best by held-out pass@1: " in capsys.readouterr().out
    assert checkpoint_manager.main(["--run", str(second_run), "best", "--scores", str(tmp_path)]) == 2
    assert "holds no scores of the checkpoints" in capsys.readouterr().err


def test_rotation_keeps_the_best_scoring_checkpoint_beside_the_newest(demo_model, demo_prepared, tmp_path,
                                                                     monkeypatch, capsys):
    scores = iter([0.5, 0.25, 0.0, 0.0])  # the first checkpoint scores best, the later ones worse

    def scorer(args, stats, inputs):
        return lambda model: {"eval_pass@1": (score := next(scores)), "eval_solved": int(score * 9)}

    monkeypatch.setattr(train, "held_out_scorer", scorer)
    out = tmp_path / "checkpoints"
    assert train.main(train_argv(demo_model, demo_prepared, out, "--score-checkpoints", max_steps=6, keep_last=1)) == 0
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]
    printed = capsys.readouterr().out
    assert "held-out pass@1 0.0% (0 solved)" in printed and f"the best kept checkpoint by score: {out}/checkpoint-2" \
        in printed


def test_scoring_needs_tests_to_run(demo_model, tmp_path, capsys):
    import download_dataset
    import prepare_data
    from conftest import write_jsonl

    rows = [{"instruction": f"Say {word}.", "output": word} for word in ("yes", "no", "maybe", "why", "how")]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    assert download_dataset.main(["--dataset", str(tmp_path / "chat.jsonl"), "--out", str(tmp_path / "data")]) == 0
    assert prepare_data.main(["--data", str(tmp_path / "data"), "--model", str(demo_model), "--out",
                              str(tmp_path / "prepared")]) == 0
    capsys.readouterr()
    assert train.main(train_argv(demo_model, tmp_path / "prepared", tmp_path / "run", "--score-checkpoints")) == 2
    assert "--score-checkpoints runs the held-out problems' tests: instruction data has none" in \
        capsys.readouterr().err
