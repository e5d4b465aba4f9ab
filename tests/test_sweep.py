"""The vmapped fine-tuning sweep: members trained in one program equal the same runs made one
by one (and the fine-tuning trainer's run of that seed), the learning-rate grid picks the
dev-best rate per cell, and label subsets are nested, stratified and deterministic."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest
from test_finetune import config_for, pretrained

from pretrain.transfer import comparison, encoding, heads, methods, sweep, tasks, trainer as transfer


def _setup(factory, **overrides):
    run = pretrained(factory)
    config = config_for(run, **overrides)
    bodies, tokenizer = transfer.load_bodies(config)
    task = tasks.load_task(config, bodies[0].run_config.data)
    data = sweep.TaskData(task, tokenizer, seq_len=config.seq_len, batch_size=config.batch_size, packed=True)
    return config, bodies, data


def _curves(results):
    return [[(r["step"], r["train_loss"], r["dev"]["loss"]) for r in result["evaluations"]] + [result["test"]["loss"]]
            for result in results]


def test_members_in_one_program_equal_the_same_runs_one_by_one(tmp_path_factory):
    config, bodies, data = _setup(tmp_path_factory)
    members = [sweep.Member(0, 1e-3), sweep.Member(1, 1e-3), sweep.Member(0, 3e-3)]
    together = sweep.train_members(config, data, lambda seed: bodies, members, total_steps=6, eval_every=3)
    alone = [sweep.train_members(config, data, lambda seed: bodies, [m], total_steps=6, eval_every=3)[0]
             for m in members]
    assert [r["learning_rate"] for r in together] == [1e-3, 1e-3, 3e-3]
    for joint, single in zip(_curves(together), _curves(alone)):
        np.testing.assert_allclose(np.asarray(joint[:-1]), np.asarray(single[:-1]), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(joint[-1], single[-1], rtol=1e-6)
    for joint, single in zip(together, alone):
        assert joint["test_predictions"] == single["test_predictions"]
        assert joint["selected_step"] == single["selected_step"]
    # the seeds and rates differ, so do the runs (the comparison above can fail)
    assert _curves(together)[0] != _curves(together)[1] and _curves(together)[0] != _curves(together)[2]


def test_a_member_is_the_run_pretrain_finetune_makes(tmp_path_factory, tmp_path):
    config, bodies, data = _setup(tmp_path_factory)
    result = sweep.train_members(config, data, lambda seed: bodies, [sweep.Member(0, 1e-3)], total_steps=8,
                                 eval_every=4)[0]
    reference = transfer.run_seeds(config, tmp_path / "ft")
    records = [r for r in transfer.read_records(tmp_path / "ft" / "seed_0") if "eval/dev/loss" in r]
    assert [r["step"] for r in records] == [e["step"] for e in result["evaluations"]] == [4, 8]
    for record, evaluation in zip(records, result["evaluations"]):
        np.testing.assert_allclose(evaluation["dev"]["loss"], record["eval/dev/loss"], rtol=1e-5)
        assert evaluation["dev"]["accuracy"] == record["eval/dev/accuracy"]
    selected = next(r for r in records if r["step"] == result["selected_step"])
    np.testing.assert_allclose(result["test"]["loss"], selected["eval/test/loss"], rtol=1e-5)
    assert reference["test"]["accuracy"]["per_seed"] == [result["test"]["accuracy"]]


def test_one_compiled_program_serves_runs_of_any_length(tmp_path_factory):
    """The schedule's breakpoints are in the optimizer state: a 10-step run after a
    6-step one reuses its program (one compilation, one state initialiser) and equals
    the same run compiled alone; the schedule it followed is BERT's for 10 steps."""
    config, bodies, data = _setup(tmp_path_factory)
    members = [sweep.Member(0, 1e-3), sweep.Member(1, 3e-3)]
    cache = sweep.ProgramCache()
    sweep.train_members(config, data, lambda seed: bodies, members, total_steps=6, eval_every=3, cache=cache)
    shared = sweep.train_members(config, data, lambda seed: bodies, members, total_steps=10, eval_every=5,
                                 cache=cache)
    assert cache.compilations == 1 and len(cache.initializers) == 1
    alone = sweep.train_members(config, data, lambda seed: bodies, members, total_steps=10, eval_every=5)
    for reused, fresh in zip(_curves(shared), _curves(alone)):
        np.testing.assert_allclose(np.asarray(reused[:-1]), np.asarray(fresh[:-1]), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(reused[-1], fresh[-1], rtol=1e-6)
    assert [r["test_predictions"] for r in shared] == [r["test_predictions"] for r in alone]
    assert [r["last_step"] for r in shared] == [10, 10]
    points = methods.schedule_points(methods.plan("full", config.methods, {("head",): 0}, 10), config.optimizer,
                                     config.methods, 10)
    assert points == {"warmup": max(1, round(10 * config.optimizer.warmup_fraction)), "total": 10}


def test_the_learning_rate_grid_picks_the_dev_best_rate_and_runs_the_other_seeds_at_it():
    """A stub task whose dev score peaks at rate 1e-3 (and whose test score is the seed)."""
    seen = []

    def train(members, total_steps, eval_every):
        seen.append((list(members), total_steps, eval_every))
        return [{"seed": m.seed, "learning_rate": m.learning_rate, "metric": "accuracy",
                 "dev": {"accuracy": 1.0 - abs(np.log10(m.learning_rate) + 3.0)}, "test": {"accuracy": m.seed}}
                for m in members]

    cell = comparison.tune_cell(train, seeds=(5, 1, 2), learning_rates=(3e-4, 1e-3, 3e-3), total_steps=8,
                                eval_every=4)
    assert seen == [([sweep.Member(5, 3e-4), sweep.Member(5, 1e-3), sweep.Member(5, 3e-3)], 8, 4),
                    ([sweep.Member(1, 1e-3), sweep.Member(2, 1e-3)], 8, 4)]
    assert cell["learning_rate"] == 1e-3
    assert cell["grid"] == {"0.0003": pytest.approx(1 - np.log10(10 / 3)), "0.001": 1.0,
                            "0.003": pytest.approx(1 - np.log10(3))}
    assert [r["seed"] for r in cell["results"]] == [5, 1, 2]
    assert {r["learning_rate"] for r in cell["results"]} == {1e-3}
    tie = comparison.tune_cell(lambda members, *_: [{"seed": m.seed, "learning_rate": m.learning_rate,
                                                     "metric": "accuracy", "dev": {"accuracy": 0.5}}
                                                    for m in members],
                               seeds=(0,), learning_rates=(3e-3, 1e-3), total_steps=1, eval_every=1)
    assert tie["learning_rate"] == 1e-3  # a tie goes to the smaller rate


def test_label_subsets_are_nested_stratified_and_deterministic():
    labels = ("a", "b", "c")
    train = tuple(tasks.TaskExample(text=f"t{i}", label=i % 3 if i < 60 else 0) for i in range(90))
    dev = (tasks.TaskExample(text="d", label=0),)
    task = tasks.Task("toy", "classification", labels, {"train": train, "dev": dev, "test": dev}, "accuracy", "toy")
    small, large = tasks.label_subset(task, 0.1), tasks.label_subset(task, 0.5)
    count = lambda t: collections.Counter(e.label for e in t.splits["train"])  # noqa: E731
    assert count(small) == {0: 5, 1: 2, 2: 2}  # round(0.1 x (50, 20, 20)); 0.1 x 20 = 2
    assert count(large) == {0: 25, 1: 10, 2: 10}
    assert set(small.splits["train"]) <= set(large.splits["train"])
    assert tasks.label_subset(task, 0.1).splits == small.splits
    assert tasks.label_subset(task, 0.1, seed=1).splits["train"] != small.splits["train"]
    assert small.splits["dev"] == dev and tasks.label_subset(task, 1.0) is task
    with pytest.raises(ValueError, match=r"label fraction 0.02 of task 'toy' leaves class 'b' \(20 training "
                                         r"examples\) without an example; use a fraction of at least 0.025"):
        tasks.label_subset(task, 0.02)


def test_mean_pooling_reads_only_its_segment():
    hidden = jax.random.normal(jax.random.key(0), (1, 8, 3))
    segment_ids = np.asarray([[1, 1, 1, 2, 2, 0, 0, 0]])
    pooled = np.asarray(heads.pool(hidden, segment_ids, "mean"))
    values = np.asarray(hidden)[0]
    np.testing.assert_allclose(pooled[0, 0], values[0:3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(pooled[0, 4], values[3:5].mean(0), rtol=1e-6)
    alone = np.asarray(heads.pool(hidden[:, 3:5], np.asarray([[1, 1]]), "mean"))  # the second example unpacked
    np.testing.assert_allclose(pooled[0, 3:5], alone[0], rtol=1e-6)


def test_the_cached_segments_are_the_rows_the_task_segments_make(tmp_path_factory):
    config, bodies, data = _setup(tmp_path_factory)
    fresh = encoding.training_stream(data.task, data.tokenizer, seq_len=config.seq_len, batch_size=8, seed=3,
                                     packed=True)
    cached = encoding.training_stream(data.task, data.tokenizer, seq_len=config.seq_len, batch_size=8, seed=3,
                                      packed=True, segments=data.segments)
    for a, b, _ in zip(iter(fresh), iter(cached), range(3)):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_every_reader_of_a_seed_gets_the_batches_a_fresh_stream_packs(tmp_path_factory):
    """TaskData packs each seed's batches once; a second reader (the next row of the
    comparison) starts again at the first batch, and both equal a fresh stream."""
    config, bodies, data = _setup(tmp_path_factory)
    fresh = iter(encoding.training_stream(data.task, data.tokenizer, seq_len=config.seq_len,
                                          batch_size=config.batch_size, seed=2, packed=True))
    first = data.stream(2)
    early = [next(first) for _ in range(2)]
    second = data.stream(2)
    later = [next(second) for _ in range(4)]  # reads past what the first reader packed
    expected = [next(fresh) for _ in range(4)]
    for got, want in zip(early + later, expected[:2] + expected):
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert len(data._replays[2].batches) == 4
    other = next(data.stream(3))
    assert not all(np.array_equal(other[k], expected[0][k]) for k in other)  # a seed's own order
