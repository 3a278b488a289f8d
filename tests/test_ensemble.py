"""The Maximum Bayes SMATCH Ensemble: the pure selection (ray_mtup.ensemble) and the command."""

from __future__ import annotations

import pytest

from ray_mtup.ensemble import pair_f1, select, support

DOG = "(c / chó :mod (đ / đen) :ARG0-of (s / sủa))"
DOG_VARIANT = "(x / chó :mod (y / đen) :ARG0-of (z / chạy))"  # one concept off DOG
CAT = "(m / mèo :location (n / nhà))"


def test_selection_picks_the_consensus_graph():
    # sentence 1: three candidates agree (two exactly, one nearly), the best-ranked one differs
    # sentence 2: the best-ranked one is the consensus
    candidates = [[CAT, DOG], [DOG, DOG], [DOG, CAT], [DOG_VARIANT, DOG]]
    chosen = select(candidates)
    assert chosen.choice == [1, 0]
    assert chosen.graphs == [DOG, DOG]
    assert chosen.wins(4) == [1, 1, 0, 0]
    # DOG's mean F against the other three (CAT, DOG, DOG_VARIANT)
    assert chosen.support[0] == pytest.approx((pair_f1(DOG, CAT) + 1.0 + pair_f1(DOG, DOG_VARIANT)) / 3)
    assert pair_f1(DOG, CAT) < pair_f1(DOG, DOG_VARIANT) < 1.0


def test_ties_go_to_the_better_ranked_trial():
    # two candidates always tie (each one's mean is the same pair F); so do three distinct graphs
    # that share nothing
    assert select([[CAT], [DOG]]).choice == [0]
    assert select([[DOG], [CAT]]).choice == [0]
    assert select([["(a / một)"], ["(b / hai)"], ["(c / ba)"]]).choice == [0]
    # two exact copies of one graph tie with each other: the earlier copy is kept
    assert select([[CAT], [DOG], [DOG]]).choice == [1]


def test_an_unparsable_candidate_counts_as_empty():
    broken = "(c / chó :mod (đ / đen"  # unbalanced: smatch cannot read it
    assert pair_f1(broken, DOG) == 0.0 and pair_f1(DOG, broken) == 0.0 and pair_f1(None, DOG) == 0.0
    assert support([broken, DOG, None]) == [0.0, 0.0, 0.0]
    # ranked first, the unparsable one still loses to the two that agree; with none agreeing, the
    # tie goes to rank 1 even when it is empty, as the empty graph is a candidate like any other
    assert select([[broken], [DOG], [DOG_VARIANT]]).choice == [1]
    assert select([[None], [DOG]]).choice == [0]


def test_candidates_must_cover_the_same_sentences():
    from ray_mtup.errors import ConfigError, ScoringError

    with pytest.raises(ScoringError, match="different numbers of sentences"):
        select([[DOG, DOG], [DOG]])
    with pytest.raises(ConfigError):
        select([])


def test_search_settings_check_the_ensemble_and_the_checkpoints_kept(capsys):
    from ray_mtup.errors import ConfigError
    from ray_mtup.launcher import main
    from ray_mtup.search import SearchSettings

    with pytest.raises(ConfigError, match="ensemble"):
        SearchSettings(name="x", storage_path="runs", num_samples=3, ensemble=5)
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        SearchSettings(name="x", storage_path="runs", keep_checkpoints=0)
    assert SearchSettings(name="x", storage_path="runs", num_samples=5, ensemble=5).ensemble == 5
    # a flag that does not apply is an error, before anything starts
    assert main(["--model", "tiny", "--no-search", "--ensemble", "3"]) == 2
    assert "--ensemble: applies to a search only" in capsys.readouterr().err


def test_the_ensemble_command_names_a_directory_that_is_not_a_search(tmp_path, capsys):
    from ray_mtup.cli import main

    assert main(["ensemble", "--run", str(tmp_path), "--top", "3"]) == 2
    assert "results.csv not found" in capsys.readouterr().err
    assert main(["predict", "--adapter", str(tmp_path), "--ensemble", "3", "--input", "x", "--output", "y"]) == 2
    assert "give --run" in capsys.readouterr().err


def test_trials_that_recovered_no_graph_do_not_outvote_the_others():
    """A trial that recovered no Task 2 graph offers the empty graph (None), as the objective scores it:
    two such agree with nothing, while predict's placeholder graphs, taken as graphs, would agree most."""
    from ray_mtup.ensemble_run import as_written
    from ray_mtup.predict import FALLBACK_GRAPH

    assert select([[g] for g in [FALLBACK_GRAPH, FALLBACK_GRAPH, DOG, DOG_VARIANT]]).choice == [0]
    chosen = select([[g] for g in [None, None, DOG, DOG_VARIANT]])
    assert chosen.choice == [2] and as_written(chosen.graphs[0]) == DOG
    assert as_written(None) == FALLBACK_GRAPH  # predict --ensemble always writes a graph
