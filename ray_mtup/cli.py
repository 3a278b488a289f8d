"""Command line: ``python -m ray_mtup <command> ...``.

Each subcommand is registered by an ``_add_<name>(subparsers)`` function that adds its
parser and sets ``handler`` to a function ``(args) -> int``. To add a command (e.g.
``predict``), write such a function and call it from :func:`build_parser`.

The handlers only translate arguments into one library call and print the result;
a :class:`~ray_mtup.errors.RayMtupError` becomes ``error: <message>`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from ray_mtup import corpus
from ray_mtup.devices import DEVICES
from ray_mtup.ensemble_run import ensemble_split, format_result, predict_ensemble
from ray_mtup.errors import ConfigError, RayMtupError
from ray_mtup.export import DTYPES, export_model
from ray_mtup.logs import setup_logging
from ray_mtup.predict import predict_file, write_parses
from ray_mtup.scoring import COMPARISON_RESAMPLES, MODES, compare_files, evaluate_files

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="python -m ray_mtup", description="Ray-distributed LoRA tuning for Vietnamese AMR parsing.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: INFO logging, -vv: DEBUG")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_evaluate(subparsers)
    _add_predict(subparsers)
    _add_ensemble(subparsers)
    _add_export(subparsers)
    return parser


# --------------------------------------------------------------------------- evaluate


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="corpus SMATCH of one predictions file against a gold file, or of two compared",
        description="Corpus-level SMATCH (summed triples, smatch 1.0.4 alignment, deterministic). "
        "Both files are in the corpus format (#::snt line, PENMAN graph, blank line); pairs are aligned by order "
        "(a #::snt that differs from the gold sentence is reported, as smatch aligns them, and only a different "
        "number of graphs is an error). The predictions are scored as they are, "
        "like the shared task's scorer: a graph smatch cannot read counts as empty. With two --pred files, "
        "both are scored and compared: F(A) - F(B) with a paired bootstrap interval over the same gold sentences.",
    )
    p.add_argument("--gold", required=True, help="gold graphs, corpus format")
    p.add_argument("--pred", required=True, action="append", metavar="PRED",
                   help="predicted graphs, corpus format; give it twice (--pred A --pred B) to compare two "
                        "systems: both F, F(A) - F(B) and its paired bootstrap 95%% interval")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="official",
        help="official: like the shared task's scorer (spaces inside concepts vanish, '_' stays); "
        "normalised: both graphs normalised first, so 'chủ tịch' == 'chủ_tịch' (default: %(default)s)",
    )
    p.add_argument("--repair", action="store_true",
                   help="repair every prediction first, as the project does with its own raw outputs (this "
                        "rewrites multi-word concepts with '_', which official mode then charges against "
                        "gold written with spaces)")
    p.add_argument("--bootstrap", type=int, default=None, metavar="N",
                   help="N bootstrap resamples for 95%% intervals (default: none for one file, "
                        f"{COMPARISON_RESAMPLES} when comparing two)")
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="list the N worst sentences (sentence, gold, prediction, per-sentence F) of each file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    if len(args.pred) > 2:
        raise ConfigError("pred", f"give one --pred file, or two to compare; got {len(args.pred)}")
    if len(args.pred) == 2:
        bootstrap = COMPARISON_RESAMPLES if args.bootstrap is None else args.bootstrap
        result = compare_files(args.gold, *args.pred, mode=args.mode, bootstrap=bootstrap, repair=args.repair,
                               show=args.show)
        text = format_comparison
    else:
        result = evaluate_files(args.gold, args.pred[0], mode=args.mode, bootstrap=args.bootstrap or 0,
                                repair=args.repair, show=args.show)
        text = format_evaluation
    print(json.dumps(result, ensure_ascii=False, sort_keys=True) if args.json else text(result))
    return 0


def format_evaluation(result: dict) -> str:
    """A short table of an :func:`~ray_mtup.scoring.evaluate_files` result.

    >>> print(format_evaluation({"mode": "official", "n_pairs": 2, "n_valid": 1, "validity": 0.5,
    ...     "precision": 0.75, "recall": 0.375, "f1": 0.5}))
    SMATCH (mode: official)
      pairs       2  (valid graphs: 1, 50.0%)
      precision   0.7500
      recall      0.3750
      f1          0.5000
    """
    lines = [
        f"SMATCH (mode: {result['mode']}{', predictions repaired' if result.get('repair') else ''})",
        f"  pairs       {result['n_pairs']}  (valid graphs: {result['n_valid']}, {100 * result['validity']:.1f}%)",
        f"  precision   {result['precision']:.4f}",
        f"  recall      {result['recall']:.4f}",
        f"  f1          {result['f1']:.4f}",
    ]
    mismatched = result.get("sentence_mismatches") or {}
    if mismatched.get("count"):
        lines.append(f"  note: {mismatched['count']} #::snt lines differ from the gold sentences (scored by "
                     f"order, as smatch scores them); first: {mismatched['first']}")
    if "ci_low" in result:
        lines.append(
            f"  f1 {100 * result['ci_level']:.0f}% CI  [{result['ci_low']:.4f}, {result['ci_high']:.4f}]"
            f"  ({result['ci_resamples']} resamples)"
        )
        lines.append(f"  note: {result['ci_note']}")
    if "worst" in result:
        lines.append(format_worst(result["worst"], result["n_pairs"]))
    return "\n".join(lines)


def format_worst(rows: list[dict], n_pairs: int) -> str:
    """The worst sentences of a result, one block each, graphs on one line.

    >>> print(format_worst([{"id": "g:2", "sentence": "mèo .", "gold": "(m / mèo)", "prediction": "(c / chó)",
    ...     "f1": 0.0, "matched": 0, "predicted_triples": 2, "gold_triples": 2, "valid": True}], 3))
      worst 1 of 3 sentences (per-sentence F):
      g:2  F 0.0000  (0 of 2 gold triples matched, 2 predicted)
        sentence    mèo .
        gold        (m / mèo)
        prediction  (c / chó)
    """
    lines = [f"  worst {len(rows)} of {n_pairs} sentences (per-sentence F):"]
    for r in rows:
        counts = f"{r['matched']} of {r['gold_triples']} gold triples matched, " + (
            f"{r['predicted_triples']} predicted" if r["valid"] else "not a graph: scored as empty")
        lines += [f"  {r['id']}  F {r['f1']:.4f}  ({counts})",
                  f"    sentence    {r['sentence']}",
                  f"    gold        {' '.join(r['gold'].split())}",
                  f"    prediction  {' '.join(r['prediction'].split()) or '(empty)'}"]
    return "\n".join(lines)


def format_comparison(result: dict) -> str:
    """Both scores of a :func:`~ray_mtup.scoring.compare_files` result, their difference and its interval.

    >>> a = {"pred_path": "a.txt", "f1": 0.5, "precision": 0.6, "recall": 0.43, "n_valid": 3, "n_pairs": 3}
    >>> b = {**a, "pred_path": "b.txt", "f1": 0.4}
    >>> print(format_comparison({"mode": "official", "n_pairs": 3, "gold_path": "g.txt", "systems": [a, b],
    ...     "delta_f1": 0.1, "delta_ci_low": -0.05, "delta_ci_high": 0.2, "ci_level": 0.95, "ci_resamples": 1000,
    ...     "beyond_noise": False}))
    SMATCH comparison (mode: official) on the 3 graphs of g.txt
      A  a.txt  f1 0.5000  (precision 0.6000, recall 0.4300, valid graphs 3 of 3)
      B  b.txt  f1 0.4000  (precision 0.6000, recall 0.4300, valid graphs 3 of 3)
      A - B     +0.1000  95% CI [-0.0500, +0.2000]  (paired bootstrap over the same sentences, 1000 resamples)
      within noise: the interval contains 0
    """
    lines = [f"SMATCH comparison (mode: {result['mode']}"
             f"{', predictions repaired' if result['systems'][0].get('repair') else ''}) "
             f"on the {result['n_pairs']} graphs of {result['gold_path']}"]
    for name, s in zip("AB", result["systems"]):
        lines.append(f"  {name}  {s['pred_path']}  f1 {s['f1']:.4f}  (precision {s['precision']:.4f}, "
                     f"recall {s['recall']:.4f}, valid graphs {s['n_valid']} of {s['n_pairs']})")
    lines.append(f"  A - B     {result['delta_f1']:+.4f}  {100 * result['ci_level']:.0f}% CI "
                 f"[{result['delta_ci_low']:+.4f}, {result['delta_ci_high']:+.4f}]  "
                 f"(paired bootstrap over the same sentences, {result['ci_resamples']} resamples)")
    if result["beyond_noise"]:
        lines.append(f"  beyond noise: {'A' if result['delta_f1'] > 0 else 'B'} is better (the interval excludes 0)")
    else:
        lines.append("  within noise: the interval contains 0")
    for name, s in zip("AB", result["systems"]):
        if "worst" in s:
            lines.append(f"  {name}:" + format_worst(s["worst"], s["n_pairs"])[1:])
    return "\n".join(lines)


# --------------------------------------------------------------------------- predict


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="parse sentences (one per line) into AMR with a trained adapter",
        description="Writes '#::snt <sentence>' + a valid PENMAN graph for every input sentence: the Task 2 "
        "output (repaired if needed), else Task 1 with variables restored, else the minimal graph "
        "'(a / amr-unknown)'; the counts of each are printed. The model reads each sentence in the form of the "
        "training sentences (lower case, '_' between syllables as a space, punctuation spaced); the #::snt lines "
        "keep the sentences as given. See docs/predict.md.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run directory (adapter/) or a search's experiment directory (best_adapter/)")
    src.add_argument("--adapter", help="an adapter directory (a checkpoint)")
    p.add_argument("--input", required=True, help="sentences, one per line (e.g. private_test.txt), or a gold file "
                                                  "in the corpus format (its #::snt lines are parsed)")
    p.add_argument("--output", required=True, help="the file to write the parses to (corpus format); checked "
                                                   "before the model loads")
    p.add_argument("--raw-input", action="store_true",
                   help="feed the sentences to the model as given, not in the training sentences' form "
                        "(warns when over 10%% of them are word-segmented or capitalised)")
    p.add_argument("--batch-size", type=int, default=32, help="generation batch (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, help="generation budget per sentence (default: the run's)")
    p.add_argument("--model-path", help="local base weights, when the run used a hub id")
    p.add_argument("--concept-style", choices=("space", "_"), default="space",
                   help="multi-word concepts as 'chủ tịch' (space: the shared task's test gold) or 'chủ_tịch' "
                        "(_: canonical PENMAN) (default: %(default)s)")
    p.add_argument("--constrained", action=argparse.BooleanOptionalAction, default=None,
                   help="grammar-constrained step-2 decoding: every graph well-formed PENMAN with fresh "
                        "variables (default: the run's constrained_decoding)")
    p.add_argument("--data-dir", help="corpus of a retrieval run's training split (default: the run's)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="gpu, cpu, or auto: the GPU when there is one, else the CPU for the tiny model and an "
                        "error for a real model (pass --device cpu) (default: %(default)s)")
    p.add_argument("--ensemble", type=int, metavar="K",
                   help="with --run <experiment>: the consensus of the search's K best trials, sentence by "
                        "sentence (docs/ensemble.md)")
    p.add_argument("--retrieval", action="store_true",
                   help="with --ensemble: the graph of the BM25-nearest training sentence is one more candidate")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    if args.ensemble is not None or args.retrieval:
        return _run_predict_ensemble(args)

    report = predict_file(args.run or args.adapter, args.input, args.output, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, model_path=args.model_path,
                          concept_style=args.concept_style, constrained=args.constrained, data_dir=args.data_dir,
                          raw_input=args.raw_input, device=args.device)
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        normalised = (f"input normalised to the training sentences' form ({report.n_input_changed} of "
                      f"{report.n_sentences} changed)" if report.input_normalised else "input as given (--raw-input)")
        print(f"wrote {report.n_sentences} graphs to {report.output}: {report.n_task2} from Task 2 "
              f"({report.n_task2_repaired} repaired), {report.n_task1_fallback} from Task 1, "
              f"{report.n_minimal} minimal fallback graphs; {normalised}")
    return 0


def _run_predict_ensemble(args: argparse.Namespace) -> int:
    if args.ensemble is None:
        raise ConfigError("retrieval", "--retrieval is a candidate of --ensemble K; give --ensemble too")
    if args.run is None:
        raise ConfigError("ensemble", "--ensemble takes a search's experiment directory: give --run, not --adapter")
    if args.max_new_tokens is not None or args.constrained is not None or args.raw_input:
        raise ConfigError("ensemble", "--max-new-tokens, --constrained and --raw-input do not apply to --ensemble: "
                                      "each trial parses the sentences' corpus form with its own settings")
    sentences = [ex.sentence for ex in corpus.read_sentences(args.input)]
    graphs, chosen, names = predict_ensemble(args.run, args.ensemble, sentences, retrieval=args.retrieval,
                                             batch_size=args.batch_size, data_dir=args.data_dir,
                                             model_path=args.model_path, device=args.device)
    out = write_parses(args.output, sentences, graphs, args.concept_style)
    report = {"n_sentences": len(sentences), "output": str(out), "candidates": names,
              "kept_for": chosen.wins(len(names))}
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        kept = ", ".join(f"{n} {w}" for n, w in zip(names, report["kept_for"]))
        print(f"wrote {len(sentences)} graphs to {out}: the consensus of {len(names)} candidates (kept: {kept})")
    return 0


# --------------------------------------------------------------------------- ensemble


def _add_ensemble(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ensemble",
        help="the consensus of a search's K best trials on its validation or test split (MBSE)",
        description="Maximum Bayes SMATCH Ensemble: the K best trials of a search each parse the split with "
        "their best checkpoint (written once under <experiment>/ensemble/ and reused); per sentence the "
        "candidate with the highest mean SMATCH F against the other candidates is kept (ties: the better "
        "trial; an unparsable graph is empty). Prints the corpus F of the ensemble, of every candidate and of "
        "the best trial, each with a bootstrap interval (docs/ensemble.md).",
    )
    p.add_argument("--run", required=True, help="a search's experiment directory (results.csv, summary.json)")
    p.add_argument("--top", type=int, required=True, metavar="K", help="how many of the best trials take part")
    p.add_argument("--retrieval", action="store_true",
                   help="the graph of the BM25-nearest training sentence is one more candidate")
    p.add_argument("--split", choices=("val", "test"), default="val", help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="generation batch (default: each trial's eval_batch_size)")
    p.add_argument("--data-dir", help="the corpus the search read (default: the one its trials recorded)")
    p.add_argument("--model-path", help="local base weights, when the search used a hub id")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(handler=_run_ensemble)


def _run_ensemble(args: argparse.Namespace) -> int:
    result = ensemble_split(args.run, args.top, args.split, retrieval=args.retrieval, batch_size=args.batch_size,
                            data_dir=args.data_dir, model_path=args.model_path)
    print(json.dumps(result, ensure_ascii=False) if args.json else format_result(result))
    return 0


# --------------------------------------------------------------------------- export


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a run's chosen adapter merged into its base, for transformers or vLLM",
        description="Loads the run's adapter onto its base as predict does, merges it (peft merge_and_unload) "
        "and writes a transformers checkpoint: safetensors weights, the tokenizer, generation_config.json with "
        "the project's greedy decoding, the run's config and a model card (README.md) with the validation "
        "and test F and their intervals.",
    )
    p.add_argument("--run", required=True,
                   help="a run directory (adapter/), a search's experiment directory (best_adapter/) or a checkpoint")
    p.add_argument("--output", required=True, help="a new (or empty) directory for the merged model")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights' dtype (auto: the base model's, e.g. bfloat16 for Qwen2.5) (default: %(default)s)")
    p.add_argument("--model-path", help="local base weights, when the run used a hub id")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    report = export_model(args.run, args.output, model_path=args.model_path, dtype=args.dtype)
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        print(f"exported {report.adapter} merged into {report.base} ({report.dtype}) to {report.output}: "
              f"{', '.join(report.files)}")
    return 0


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else 2

    setup_logging({0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG))
    try:
        return args.handler(args)
    except RayMtupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
