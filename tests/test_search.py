"""The search end to end on CPU: ``run_tune.py --model tiny --smoke-test`` on a Ray cluster.

The real entry point, run once for the suite (conftest.py's ``smoke_search``: submitted as a job to
the session's cluster, as a user would) on the shipped sample corpus; these tests check what it
wrote. The driver-kill / ``--resume`` case is in ``test_faults.py``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ray_mtup.config import SEARCH_SPACES, packaged_yaml, resolve_config
from ray_mtup.search import documented_optimum, load_search_space

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``run_tune.py`` on the session's cluster (``RAY_ADDRESS`` is in this process's environment)."""
    proc = subprocess.run([sys.executable, "run_tune.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def smoke(smoke_search) -> tuple[Path, SimpleNamespace]:
    """The suite's one smoke search (conftest.py's ``smoke_search``, submitted to the session's Ray
    cluster as a job): its experiment directory and the driver's output (stdout and stderr, as the
    job's log holds them)."""
    assert smoke_search.status == "SUCCEEDED", smoke_search.logs[-6000:]
    return smoke_search.exp, SimpleNamespace(stdout=smoke_search.logs, stderr="")


def _rows(exp: Path) -> list[dict]:
    with (exp / "results.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_smoke_search_runs_four_trials_first_is_documented_optimum(smoke):
    exp, proc = smoke
    rows = _rows(exp)
    assert len(rows) >= 4
    assert all(r["status"] == "TERMINATED" for r in rows)
    first = min(rows, key=lambda r: int(r["trial_index"]))
    space = load_search_space(packaged_yaml(SEARCH_SPACES, "smoke"))
    expected = documented_optimum(space, resolve_config("tiny").replace(**space.overrides))
    for key, value in expected.items():
        got = first[key]
        assert (float(got) == pytest.approx(float(value))) if isinstance(value, (int, float)) else got == value
    assert "trial" in proc.stdout and "T2 F1" in proc.stdout  # the leaderboard was printed


def test_asha_stopped_at_least_one_trial_early(smoke):
    rows = _rows(smoke[0])
    early = [r for r in rows if r["stopped_early"] == "True"]
    assert early, rows
    for r in early:
        assert int(r["epochs_run"]) < int(r["epochs"])


def test_results_files_agree(smoke):
    exp, _ = smoke
    rows = _rows(exp)
    summary = json.loads((exp / "summary.json").read_text(encoding="utf-8"))
    best_config = yaml.safe_load((exp / "best_config.yaml").read_text(encoding="utf-8"))
    assert summary["n_trials"] == len(rows) and summary["n_errors"] == 0
    by_id = {r["trial_id"]: r for r in rows}
    best_row = by_id[summary["best_trial"]]

    def objective(r: dict) -> float:
        return float(r["best_task2_f1"]) - 1e-4 * min(float(r["val_loss"]), 10.0)

    assert objective(best_row) == pytest.approx(max(objective(r) for r in rows))
    assert float(best_row["best_task2_f1"]) == pytest.approx(summary["best_metrics"]["task2_f1"])
    assert best_config["learning_rate"] == pytest.approx(float(best_row["learning_rate"]))
    assert best_config["lora"]["r"] == int(best_row["lora_r"])
    assert best_config == summary["best_config"]
    for png in ("f1_per_epoch.png", "f1_vs_lr.png"):
        assert (exp / png).read_bytes()[:4] == b"\x89PNG"
    assert (exp / "best_adapter" / "adapter_model.safetensors").is_file()
    test = [json.loads(line) for line in (exp / "test_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(test) == summary["test"]["n_graphs"] and all("gold" in r and "task2_f1" in r for r in test)
    lo, hi = summary["noise"]["ci95"]
    assert 0.0 <= lo <= summary["noise"]["task2_f1"] <= hi <= 1.0
    cost = summary["cost"]
    assert cost["total_cpu_hours"] > 0 and cost["asha_saved_cpu_hours"] > 0
    assert "vs_documented_optimum" in summary["noise"]


def test_best_config_reproduces_its_result(smoke, tmp_path):
    exp, _ = smoke
    summary = json.loads((exp / "summary.json").read_text(encoding="utf-8"))
    best_epoch = int(summary["best_metrics"]["epoch"])
    proc = _run("--no-search", "--config", str(exp / "best_config.yaml"), "--storage-path", str(tmp_path),
                "--name", "repro", "--set", f"epochs={summary['best_config']['epochs']}")
    history = json.loads((tmp_path / "repro" / "summary.json").read_text(encoding="utf-8"))["history"]
    _check_single_run_tracked(tmp_path / "repro", "repro", len(history), proc.stdout)
    again = next(m for m in history if m["epoch"] == best_epoch)
    # Same seed, data and order: the rerun matches within noise (here: near-exactly on CPU).
    assert again["task2_f1"] == pytest.approx(summary["best_metrics"]["task2_f1"], abs=0.02)
    assert math.isclose(again["val_loss"], summary["best_metrics"]["val_loss"], rel_tol=1e-2)


def _check_single_run_tracked(run_dir: Path, name: str, epochs: int, stdout: str) -> None:
    """A --no-search run is one MLflow run (the default tracker) with every epoch and the test figure."""
    from mlflow.tracking import MlflowClient

    from ray_mtup.tracking import mlflow_uri

    client = MlflowClient(tracking_uri=mlflow_uri(run_dir))
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, "task2_f1")) == \
        list(range(1, epochs + 1))
    assert "test_task2_f1" in run.data.metrics
    assert "corpus:  the sample corpus" in stdout and "mlflow ui --backend-store-uri" in stdout


def test_mlflow_store_has_one_run_per_trial_with_params_and_every_epoch(smoke, monkeypatch):
    """The default tracker: MLflow's client reads the SQLite store back from the experiment dir,
    with no setting (MLFLOW_ALLOW_FILE_STORE unset)."""
    from mlflow.tracking import MlflowClient

    from ray_mtup.tracking import mlflow_uri

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    exp, proc = smoke
    rows = {r["trial_id"]: r for r in _rows(exp)}
    client = MlflowClient(tracking_uri=mlflow_uri(exp))
    experiment = client.get_experiment_by_name("smoke")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == len(rows)
    space = load_search_space(packaged_yaml(SEARCH_SPACES, "smoke"))
    for run in runs:
        trial_id = next(t for t in rows if t in run.info.run_name)
        row = rows[trial_id]
        for key in space.params:  # the trial's sampled parameters
            got, want = run.data.params[key], row[key]
            assert float(got) == pytest.approx(float(want)) if key != "template" else got == want
        history = client.get_metric_history(run.info.run_id, "task2_f1")
        assert sorted(int(m.step) for m in history) == list(range(1, int(row["epochs_run"]) + 1))
        assert max(m.value for m in history) == pytest.approx(float(row["best_task2_f1"]))
    assert "mlflow ui --backend-store-uri" in proc.stdout


def test_progress_lines_baseline_and_optuna_plots(smoke):
    exp, proc = smoke
    rows = _rows(exp)
    summary = json.loads((exp / "summary.json").read_text(encoding="utf-8"))
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "(best so far" in ln]
    assert len(lines) == sum(int(r["epochs_run"]) for r in rows)  # one line per finished epoch
    ended = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "trials done; best task2_f1 so far" in ln]
    assert len(ended) == len(rows) and f"{len(rows)} of {len(rows)} trials done" in ended[-1]  # one per trial
    # the closing summary names the corpus: the sample one, whose scores say nothing of Vietnamese AMR
    assert "say nothing about Vietnamese AMR" in proc.stdout and summary["corpus"].startswith("the sample corpus")
    baseline = summary["baseline"]
    assert 0.0 <= baseline["task2_f1"] < 1.0 and f"{baseline['task2_f1']:.4f}" in proc.stdout
    # the demo learns: its best trial is clearly above the most-frequent-graph baseline
    assert summary["best_metrics"]["task2_f1"] > baseline["task2_f1"] + 0.05
    for png in ("optuna_history.png", "optuna_importances.png", "optuna_slice.png"):
        assert (exp / png).read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- the ensemble (MBSE)


def test_summary_scores_the_ensemble_of_the_top_trials(smoke):
    exp, proc = smoke
    ranked = sorted(_rows(exp), key=lambda r: (-float(r["best_objective"]), int(r["trial_index"])))
    ensemble = json.loads((exp / "summary.json").read_text(encoding="utf-8"))["ensemble"]
    assert ensemble["top"] == 3 and "error" not in ensemble
    for key in ("val", "test", "val_retrieval", "test_retrieval"):
        r = ensemble[key]
        names = [c["name"] for c in r["candidates"]]
        assert names[:3] == [row["trial_id"] for row in ranked[:3]]
        assert names[3:] == (["bm25_lookup"] if key.endswith("retrieval") else [])
        assert sum(c["kept_for"] for c in r["candidates"]) == r["n_graphs"] > 0
        assert r["best_trial_f1"] == r["candidates"][0]["f1"]
        lo, hi = r["ensemble_ci95"]
        assert 0.0 <= lo <= r["ensemble_f1"] <= hi <= 1.0
        assert f"{r['ensemble_f1']:.4f}" in proc.stdout  # the leaderboard's footer line
    # a candidate is scored as the objective scores it: the best trial's test F is the summary's test figure
    summary = json.loads((exp / "summary.json").read_text(encoding="utf-8"))
    assert ensemble["test"]["best_trial"] == summary["best_trial"]
    assert ensemble["test"]["best_trial_f1"] == pytest.approx(summary["test"]["task2_f1"], abs=1e-12)
    # each trial parsed each split once, under the experiment directory
    for row in ranked[:3]:
        assert {p.name for p in (exp / "ensemble" / row["trial_id"]).iterdir()} == {"val.json", "test.json"}


def test_ensemble_command_reuses_the_parses_and_agrees_with_the_summary(smoke, capsys):
    from ray_mtup.cli import main

    exp, _ = smoke
    cached = {p: p.stat().st_mtime_ns for p in (exp / "ensemble").rglob("*.json")}
    assert main(["ensemble", "--run", str(exp), "--top", "3", "--retrieval", "--split", "val", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = json.loads((exp / "summary.json").read_text(encoding="utf-8"))["ensemble"]["val_retrieval"]
    assert result["ensemble_f1"] == expected["ensemble_f1"] and result["n_graphs"] == expected["n_graphs"]
    assert [c["f1"] for c in result["candidates"]] == [c["f1"] for c in expected["candidates"]]
    assert result["best_trial_f1"] == result["candidates"][0]["f1"]
    assert result["smatch_pairs"] == result["n_graphs"] * 4 * 3 // 2
    assert {p: p.stat().st_mtime_ns for p in (exp / "ensemble").rglob("*.json")} == cached  # nothing re-parsed
    # the table names every candidate, the ensemble and the best trial
    assert main(["ensemble", "--run", str(exp), "--top", "2", "--split", "test"]) == 0
    table = capsys.readouterr().out
    assert "ensemble of the top 2 trials on test" in table and "best trial" in table


def test_ensemble_asks_for_more_trials_than_the_search_has(smoke, capsys):
    from ray_mtup.cli import main

    assert main(["ensemble", "--run", str(smoke[0]), "--top", "99", "--split", "val"]) == 2
    assert "fewer than the 99 asked for" in capsys.readouterr().err


def test_predict_ensemble_writes_one_graph_per_sentence_in_input_order(smoke, fixtures_dir, tmp_path, capsys):
    from ray_mtup.cli import main
    from ray_mtup.scoring import read_blocks, score_pair

    sentences = [ln.strip() for ln in (fixtures_dir / "mini_sentences.txt").read_text(encoding="utf-8").splitlines()
                 if ln.strip()]
    out = tmp_path / "ensemble.txt"
    assert main(["predict", "--run", str(smoke[0]), "--ensemble", "3", "--retrieval",
                 "--input", str(fixtures_dir / "mini_sentences.txt"), "--output", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    blocks = read_blocks(out)
    assert [b.sentence for b in blocks] == sentences and report["n_sentences"] == len(sentences)
    assert sum(report["kept_for"]) == len(sentences) and len(report["candidates"]) == 4
    for b in blocks:  # every written graph is one smatch reads
        assert score_pair(b.graph, b.graph).matched > 0


def test_export_of_the_best_trial_loads_in_transformers_and_parses_like_predict(smoke, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_mtup.cli import main
    from ray_mtup.config import TrainConfig, load_yaml
    from ray_mtup.predict import parse_sentences, predict_file, write_parses

    exp, _ = smoke
    out = tmp_path / "merged"
    assert main(["export", "--run", str(exp), "--output", str(out)]) == 0
    assert f"exported {exp / 'best_adapter'} merged into" in capsys.readouterr().out
    summary = json.loads((exp / "summary.json").read_text(encoding="utf-8"))
    cfg = TrainConfig.from_dict(load_yaml(out / "ray_mtup_config.yaml"))
    best = TrainConfig.from_dict(summary["best_config"])  # as given ('auto' stays); the export's is as resolved
    assert (cfg.template, cfg.learning_rate, cfg.epochs, cfg.lora, cfg.seed) == (
        best.template, best.learning_rate, best.epochs, best.lora, best.seed)
    # the card: the search's validation interval (noise analysis) and the best trial's test figure
    card = (out / "README.md").read_text(encoding="utf-8")
    ci, test = summary["noise"]["ci95"], summary["test"]
    assert f"| {summary['best_metrics']['task2_f1']:.4f} | {ci[0]:.4f} - {ci[1]:.4f} |" in card
    assert f"| {test['task2_f1']:.4f} | {test['ci95'][0]:.4f} - {test['ci95'][1]:.4f} |" in card
    best_card = (exp / "best_adapter" / "README.md").read_text(encoding="utf-8")  # the project's, not peft's
    assert "library_name: peft" in best_card and f"| {test['task2_f1']:.4f} |" in best_card

    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    sentences = ["tôi đi học .", "con mèo ngủ trên ghế ."]
    (tmp_path / "in.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    predict_file(exp, tmp_path / "in.txt", tmp_path / "predict.txt", batch_size=2)
    graphs = parse_sentences(model, tokenizer, cfg, sentences, batch_size=2, progress=False).graphs
    write_parses(tmp_path / "exported.txt", sentences, graphs, "space")
    assert (tmp_path / "exported.txt").read_text(encoding="utf-8") == (tmp_path / "predict.txt").read_text(
        encoding="utf-8")
