"""--mlflow: a tiny run logged to a local MLflow store and read back with the MLflow client; evaluate's
EM-vs-TTFT plot; without the flag MLflow is not imported."""
import json
import os
import subprocess
import sys

import pytest

import refrag
from conftest import DATA, ROOT, load_json, run_cli


def qa_file(tmp_path, small_corpus, n=2):
    with open(os.path.join(DATA, "rag_train.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    names = {line.split(" ", 1)[0] for line in open(small_corpus, encoding="utf-8")}
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["entity"] in names][:n]))
    return path


def recon_args(dec, out, *extra):
    return ["cpt_recon", "--dec", dec, "--train_json", os.path.join(DATA, "cpt_eval.jsonl"), "--eval_json", "",
            "--k", 8, "--max_chunks", 2, "--steps", 4, "--batch_size", 2, "--log_every", 1, "--out_dir", out, *extra]


def test_trainer_and_evaluate_runs_read_back_from_mlflow(tiny_dec_dir, tiny_index, small_corpus, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    code, out, err = run_cli(*recon_args(tiny_dec_dir, tmp_path / "recon", "--mlflow", store))
    assert code == 0, err
    argv = ["evaluate", "--eval_json", qa_file(tmp_path, small_corpus), "--index_dir", tiny_index, "--dec", tiny_dec_dir,
            "--modes", "full,refrag", "--k", 16, "--p", "0,0.5", "--max_new", 3, "--out", tmp_path / "ev", "--mlflow", store]
    code, out, err = run_cli(*argv)
    assert code == 0, err
    client = mlflow.MlflowClient("file:" + str(store))
    runs = {r.data.tags["command"].split()[1]: r for r in client.search_runs([client.get_experiment_by_name("refrag").experiment_id])}
    assert set(runs) == {"cpt_recon", "evaluate"} and all(r.info.status == "FINISHED" for r in runs.values())
    recon = runs["cpt_recon"]
    assert recon.data.params["k"] == "8" and recon.data.params["steps"] == "4"
    logged = [(m.step, m.value) for m in client.get_metric_history(recon.info.run_id, "loss")]
    written = [(r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / "recon" / "metrics.jsonl"))]
    assert [s for s, _ in sorted(logged)] == [s for s, _ in written] == [1, 2, 3, 4]  # metrics.jsonl is the source
    assert [v for _, v in sorted(logged)] == pytest.approx([v for _, v in written])
    assert {"run_config.json", "metrics.jsonl"} <= {a.path for a in client.list_artifacts(recon.info.run_id)}
    ev = runs["evaluate"]
    res = load_json(tmp_path / "ev" / "results.json")["results"]
    assert ev.data.metrics["results.full.em"] == pytest.approx(res[0]["em"])
    assert ev.data.metrics["results.refrag_16_0.5_random.ttft_s"] == pytest.approx(res[2]["ttft_s"])
    assert ev.data.metrics["results.refrag_16_0.5_random_expanded-only.ttft_s"] == pytest.approx(res[3]["ttft_s"])
    assert {"results.json", "results.md", "em_vs_ttft.png"} <= {a.path for a in client.list_artifacts(ev.info.run_id)}


def test_failed_run_is_logged_as_failed(tiny_dec_dir, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    os.makedirs(tmp_path / "recon")
    code, out, err = run_cli(*recon_args(tiny_dec_dir, tmp_path / "recon", "--mlflow", store, "--load_dir", tmp_path / "none"))
    assert code == 2 and "not a refrag checkpoint" in err
    client = mlflow.MlflowClient("file:" + str(store))
    (run,) = client.search_runs([client.get_experiment_by_name("refrag").experiment_id])
    assert run.info.status == "FAILED"


def test_evaluate_plots_em_against_ttft_for_every_configuration(tiny_dec_dir, tiny_index, small_corpus, tmp_path):
    code, out, err = run_cli("evaluate", "--eval_json", qa_file(tmp_path, small_corpus), "--index_dir", tiny_index,
                             "--dec", tiny_dec_dir, "--modes", "full,refrag,none", "--k", 16, "--p", "0,0.5",
                             "--max_new", 3, "--out", tmp_path / "ev")
    assert code == 0, err
    png = tmp_path / "ev" / "em_vs_ttft.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    result = load_json(tmp_path / "ev" / "results.json")
    points = refrag.plot_quality(result, str(tmp_path / "again.png"))
    assert [(p[1], p[2]) for p in points] == [(r["ttft_s"] * 1000, r["em"]) for r in result["results"]]
    assert [p[0] for p in points] == ["full", "refrag k=16 p=0 sel=none", "refrag k=16 p=0.5 sel=random",
                                      "refrag k=16 p=0.5 sel=random expanded-only", "none"]  # evaluate's row names


def test_without_the_flag_mlflow_is_not_imported(tiny_dec_dir, tmp_path):
    argv = [str(a) for a in recon_args(tiny_dec_dir, tmp_path / "recon")]
    code = f"import sys, refrag\ntry:\n    refrag.main({argv!r})\nfinally:\n    print('MLFLOW', 'mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "MLFLOW False" in out.stdout and os.path.isfile(tmp_path / "recon" / "metrics.jsonl")


def test_metrics_reach_mlflow_while_the_run_is_going(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    cfg = refrag.EvalConfig(out=str(tmp_path / "run"), mlflow=str(tmp_path / "mlruns"))
    os.makedirs(cfg.out)
    metrics = tmp_path / "run" / "metrics.jsonl"
    run = refrag.MlflowRun(cfg.mlflow, cfg, cfg.out)  # as the command starts
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # a line being written
    run.sync()
    client = mlflow.MlflowClient("file:" + str(tmp_path / "mlruns"))
    history = lambda: [(m.step, m.value) for m in client.get_metric_history(run.rid, "loss")]  # noqa: E731
    assert sorted(history()) == [(1, 2.0), (2, 1.5)] and client.get_run(run.rid).info.status == "RUNNING"
    with open(metrics, "a") as fh:
        fh.write('ss": 1.25}\n')
    run.finish("FINISHED")
    assert sorted(history()) == [(1, 2.0), (2, 1.5), (3, 1.25)] and client.get_run(run.rid).info.status == "FINISHED"


def test_mlflow_follows_only_this_command_s_rows_and_resends_a_failed_round(tmp_path, monkeypatch):
    """Rows already in metrics.jsonl belong to an earlier command; a file begun anew is read from its start; a
    round MLflow refused is sent again (its rows were skipped: the offset moved before the rows were taken)."""
    mlflow = pytest.importorskip("mlflow")
    out, store = tmp_path / "run", tmp_path / "mlruns"
    out.mkdir()
    rows = lambda steps, loss: "".join(json.dumps({"step": s, "loss": loss}) + "\n" for s in steps)  # noqa: E731
    (out / "metrics.jsonl").write_text(rows([1, 2], 9.0))  # an earlier run's
    run = refrag.MlflowRun(str(store), refrag.TrainConfig(stage="cpt_recon", out_dir=str(out)), str(out))
    run.stop.set()
    run.thread.join()
    (out / "metrics.jsonl").write_text(rows([1, 2, 3], 1.0))  # started again from step 0, as long as the old file
    real, calls = run.client.log_batch, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("server away")
        return real(*a, **kw)

    monkeypatch.setattr(run.client, "log_batch", flaky)
    with pytest.raises(ConnectionError):
        run.sync()
    run.sync()
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(rows([4], 0.5))
    os.rename(out, str(out) + ".old")  # a checkpoint swapping out_dir in: no metrics.jsonl for a moment
    run.sync()
    os.rename(str(out) + ".old", out)
    run.sync()
    client = mlflow.MlflowClient(run.uri)
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.rid, "loss")) == \
        [(1, 1.0), (2, 1.0), (3, 1.0), (4, 0.5)]
