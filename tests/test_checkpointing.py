"""Checkpoints that break in practice, without Ray: a save that fails half-way (a full disk),
a truncated adapter, a missing or unparseable trainer state, a half-written directory; and the
resume that falls back to the newest complete earlier checkpoint, or stops naming the file.

The same faults inside a running search are in ``tests/test_faults.py``.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from ray_mtup import checkpointing
from ray_mtup.checkpointing import ADAPTER_CONFIG_FILE, ADAPTER_FILE, STATE_FILE
from ray_mtup.config import TrainConfig, parse_fault
from ray_mtup.errors import CheckpointError, ConfigError
from ray_mtup.faults import FaultInjector


def _tiny_cfg() -> TrainConfig:
    return TrainConfig(model="tiny", tiny={"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                          "intermediate_size": 64, "vocab_size": 300},
                       lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "train_base": True})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from ray_mtup.modeling import WeightsSource, apply_lora, build_model, build_tokenizer, write_tiny_checkpoint

    cfg = _tiny_cfg()
    source = WeightsSource(str(write_tiny_checkpoint(cfg.tiny, 0, ["tôi đi học", "(m / muốn :agent (t / tôi))"] * 20,
                                                     cache_dir=tmp_path_factory.mktemp("base"))))
    tok = build_tokenizer(source)

    def model():
        torch.manual_seed(0)
        return apply_lora(build_model(source, cfg, tok, "cpu"), cfg.lora)

    return SimpleNamespace(cfg=cfg, tokenizer=tok, model=model)


def _save(tiny, directory: Path, epoch: int, before_write=None) -> dict:
    """Save a checkpoint whose trainable weights are the fresh model's plus ``epoch / 100``."""
    import torch

    model = tiny.model()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(epoch / 100)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = {"epoch": epoch, "global_step": 3 * epoch, "history": [{"epoch": e} for e in range(1, epoch + 1)],
             "config": tiny.cfg.to_dict(), "adapter_digest": checkpointing.weights_digest(weights)}
    checkpointing.save_checkpoint(directory, model, tiny.tokenizer, state, weights,
                                  [{"id": "a", "sentence": "tôi", "raw": "", "task1_graph": None,
                                    "task2_graph": None}], before_write=before_write)
    return state


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """Two complete checkpoints (epochs 1 and 2) of the same run."""
    root = tmp_path_factory.mktemp("run")
    states = {e: _save(tiny, root / f"checkpoint_{e}", e) for e in (1, 2)}
    return SimpleNamespace(root=root, states=states)


def _copy(saved, epoch: int, tmp_path: Path) -> Path:
    target = tmp_path / f"checkpoint_{epoch}"
    shutil.copytree(saved.root / f"checkpoint_{epoch}", target)
    return target


# --- atomic writes ---------------------------------------------------------------------------


def test_failed_save_leaves_nothing_under_the_target(tiny, tmp_path):
    def disk_full(name: str) -> None:
        if name == STATE_FILE:  # the adapter and tokenizer are already written
            raise OSError(errno.ENOSPC, "No space left on device", name)

    with pytest.raises(OSError) as info:
        _save(tiny, tmp_path / "checkpoint", 3, before_write=disk_full)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # neither the target nor a partial temporary directory


def test_checkpoint_carries_the_projects_card_not_pefts_blank_one(saved):
    card = (saved.root / "checkpoint_2" / "README.md").read_text(encoding="utf-8")
    assert "More Information Needed" not in card  # peft's template
    assert "library_name: peft" in card and "# Vietnamese AMR parser (MTUP)" in card
    assert "r 4, alpha 8, dropout" in card and "on q_proj, v_proj (base weights trained too)" in card
    assert "| validation (chose the epoch; optimistic) | not measured |" in card  # epoch 2 reported no F


def test_save_is_complete_and_refuses_to_overwrite(tiny, saved, tmp_path):
    target = _copy(saved, 1, tmp_path)
    assert checkpointing.validate_checkpoint(target)["epoch"] == 1
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    with pytest.raises(CheckpointError, match="refusing to overwrite") as info:
        _save(tiny, target, 5)
    assert info.value.path == str(target)
    assert json.loads((target / STATE_FILE).read_text())["epoch"] == 1  # untouched


def test_injected_disk_full_hook_fails_only_its_epoch():
    cfg = TrainConfig(inject_fault="disk_full@2")
    faults = FaultInjector(cfg, rank=0, world=1)
    assert faults.write_hook(1) is None
    hook = faults.write_hook(2)
    hook(ADAPTER_FILE)  # the adapter is written...
    with pytest.raises(OSError) as info:
        hook(STATE_FILE)  # ...then the disk is full
    assert info.value.errno == errno.ENOSPC


# --- validation ------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated adapter": (lambda d: _truncate(d / ADAPTER_FILE), ADAPTER_FILE, "truncated or corrupt"),
    "truncated base weights": (lambda d: _truncate(d / "base_model.safetensors"), "base_model.safetensors",
                               "truncated or corrupt"),
    "missing trainer state": (lambda d: (d / STATE_FILE).unlink(), STATE_FILE, "missing"),
    "unparseable trainer state": (lambda d: (d / STATE_FILE).write_text('{"epoch": 2, "glo'), STATE_FILE,
                                  "unreadable trainer state"),
    "trainer state without history": (lambda d: (d / STATE_FILE).write_text('{"epoch": 2}'), STATE_FILE,
                                      "lacks"),
    "missing adapter config": (lambda d: (d / ADAPTER_CONFIG_FILE).unlink(), ADAPTER_CONFIG_FILE, "missing"),
    # what a kill during a non-atomic save leaves: the adapter, nothing after it
    "half-written directory": (lambda d: [p.unlink() for p in d.iterdir()
                                          if p.name not in (ADAPTER_FILE, ADAPTER_CONFIG_FILE)],
                               STATE_FILE, "missing"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_is_named(saved, tmp_path, kind):
    damage, name, message = DAMAGE[kind]
    target = _copy(saved, 2, tmp_path)
    damage(target)
    with pytest.raises(CheckpointError, match=message) as info:
        checkpointing.validate_checkpoint(target)
    assert info.value.path == str(target / name)
    assert str(target / name) in str(info.value)


# --- resume: the latest checkpoint, a fallback, or an error naming the file --------------------


def _resume(tiny, monkeypatch, latest: Path, kept: list[Path]) -> tuple[dict, object]:
    """Resume as a Ray Train worker does: the session offers Ray's latest checkpoint, then the
    run's other kept ones, newest first."""
    import ray.train

    from ray_mtup.session import RaySession

    def reported(consistency_mode=None, timeout_s=None):
        return [SimpleNamespace(checkpoint=ray.train.Checkpoint.from_directory(str(p)),
                                metrics={"epoch": int(p.name.rsplit("_", 1)[1])}) for p in kept]

    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(latest)))
    monkeypatch.setattr(ray.train, "get_all_reported_checkpoints", reported)
    model = tiny.model()
    with object.__new__(RaySession).resume_from() as candidates:
        return checkpointing.load_resume_state(model, candidates), model


def _digest(model) -> str:
    return checkpointing.weights_digest({n: p for n, p in model.named_parameters() if p.requires_grad})


def test_resume_uses_an_intact_latest_checkpoint(tiny, saved, tmp_path, monkeypatch):
    ckpts = [_copy(saved, e, tmp_path) for e in (1, 2)]
    state, model = _resume(tiny, monkeypatch, ckpts[1], ckpts)
    assert state["epoch"] == 2 and "resume_note" not in state
    assert _digest(model) == state["adapter_digest"] == saved.states[2]["adapter_digest"]


@pytest.mark.parametrize("kind", ["truncated adapter", "missing trainer state", "half-written directory"])
def test_resume_falls_back_to_the_previous_complete_checkpoint(tiny, saved, tmp_path, monkeypatch, kind, caplog):
    damage, name, _ = DAMAGE[kind]
    ckpts = [_copy(saved, e, tmp_path) for e in (1, 2)]
    damage(ckpts[1])
    state, model = _resume(tiny, monkeypatch, ckpts[1], ckpts)
    assert state["epoch"] == 1 and state["global_step"] == 3
    assert _digest(model) == saved.states[1]["adapter_digest"]  # epoch 1's weights, all of them
    assert name in state["resume_note"] and "resumed from the epoch-1 checkpoint" in state["resume_note"]
    assert any(name in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_resume_without_a_complete_checkpoint_names_the_file(tiny, saved, tmp_path, monkeypatch):
    ckpts = [_copy(saved, e, tmp_path) for e in (1, 2)]
    _truncate(ckpts[1] / ADAPTER_FILE)
    (ckpts[0] / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match="not starting again from scratch") as info:
        _resume(tiny, monkeypatch, ckpts[1], ckpts)
    assert info.value.path == str(ckpts[1] / ADAPTER_FILE)


def test_resume_of_a_stopped_run_loads_no_weights(tiny, saved, tmp_path, monkeypatch):
    stopped = tmp_path / "checkpoint_3"
    state = {"epoch": 3, "global_step": 9, "history": [{"epoch": 3}], "stop_reason": "out of memory at micro-batch 2"}
    checkpointing.save_stop_state(stopped, state)
    got, model = _resume(tiny, monkeypatch, stopped, [stopped])
    assert got["stop_reason"] == state["stop_reason"]
    assert _digest(model) == _digest(tiny.model())  # untouched


# --- the fault specs -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["oom@2", "oom@x:1", "disk_full@1:2", "boom@1", "oom@-1:2", "nan_loss", ""])
def test_bad_fault_spec_names_the_field(spec):
    with pytest.raises(ConfigError) as info:
        parse_fault(spec) if spec == "" else TrainConfig(inject_fault=spec)
    assert info.value.field == "inject_fault"


def test_injected_oom_only_at_its_micro_batch_on_the_last_rank():
    import torch

    cfg = TrainConfig(inject_fault="oom@2:3")
    last, first = FaultInjector(cfg, rank=1, world=2), FaultInjector(cfg, rank=0, world=2)
    for epoch, micro in [(1, 3), (2, 2), (2, 4)]:
        last.before_micro_step(epoch, micro)
    first.before_micro_step(2, 3)
    with pytest.raises(torch.OutOfMemoryError):
        last.before_micro_step(2, 3)


def test_validation_predictions_are_saved_with_gold_and_per_sentence_f(tiny, tmp_path):
    """What score_epoch scored, per sentence, beside its gold graph: the JSONL for re-scoring,
    the .txt still in the corpus format (gold and F as comment lines)."""
    from ray_mtup import scoring
    from ray_mtup.evaluation import prediction_records, score_epoch
    from ray_mtup.generation import Parsed

    val = [SimpleNamespace(id="v:1", sentence="chó sủa"), SimpleNamespace(id="v:2", sentence="mèo")]
    gold = ["(s / sủa :agent (c / chó))", "(m / mèo)"]
    parsed = [Parsed("raw 1", None, "(s / sủa :agent (x / mèo))", False), Parsed("raw 2", None, None, False)]
    metrics, pairs = score_epoch(tiny.cfg, gold, parsed, val_loss=1.0)
    records = prediction_records(val, gold, parsed, pairs)
    model = tiny.model()
    weights = checkpointing.trainable_state(model)
    checkpointing.save_checkpoint(tmp_path / "c", model, tiny.tokenizer, {"epoch": 1, "global_step": 1, "history": []},
                                  weights, records)
    saved = [json.loads(line) for line in (tmp_path / "c" / checkpointing.PREDICTIONS_JSONL).read_text().splitlines()]
    assert [r["gold"] for r in saved] == gold and [r["id"] for r in saved] == ["v:1", "v:2"]
    assert saved[0]["task2_f1"] == pytest.approx(scoring.score_pair(gold[0], parsed[0].task2_graph, "normalised").f1)
    assert 0 < saved[0]["task2_f1"] < 1 and saved[1]["task2_f1"] == 0.0
    blocks = scoring.read_blocks(tmp_path / "c" / checkpointing.PREDICTIONS_FILE)
    assert [b.graph for b in blocks] == [parsed[0].task2_graph, ""]  # comments are not graphs
    text = (tmp_path / "c" / checkpointing.PREDICTIONS_FILE).read_text()
    assert "# gold (m / mèo)" in text and f"# F {saved[0]['task2_f1']:.4f}" in text
