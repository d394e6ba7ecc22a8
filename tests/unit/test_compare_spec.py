import pytest

from ps.compare.report import summarize, table
from ps.compare.runner import RunResult
from ps.compare.spec import CompareConfig, RunSpec, parse_faults, parse_runs
from ps.errors import InvalidArgument


def test_configurations_parse_with_their_options():
    runs = parse_runs("sync, async+slr,ssp:4,sync+backup=1,ssp:0+slr,allreduce", 4)
    assert runs == [RunSpec("sync", "sync"), RunSpec("async+slr", "async", staleness_lr=True),
                    RunSpec("ssp:4", "ssp", 4), RunSpec("sync+backup=1", "sync", backup=1),
                    RunSpec("ssp:0+slr", "ssp", 0, staleness_lr=True), RunSpec("allreduce", "allreduce")]
    assert parse_runs("sync+early,async+prefetch+early+slr", 2) == [
        RunSpec("sync+early", "sync", push_early=True),
        RunSpec("async+prefetch+early+slr", "async", staleness_lr=True, push_early=True, prefetch=True)]


@pytest.mark.parametrize("text, rule", [
    ("bsp", "must look like"), ("ssp", "needs its bound"), ("sync:2", "only ssp takes a bound"),
    ("async+backup=1", "does not apply"), ("sync+slr", "does not apply"), ("sync+backup=4", "must be < workers"),
    ("sync,sync", "must not repeat"), ("sync+prefetch", "does not apply"), ("allreduce+early", "does not apply"),
    ("async+prefetch+prefetch", "does not apply"),
])
def test_bad_configurations_name_the_rule(text, rule):
    with pytest.raises(InvalidArgument, match=rule):
        parse_runs(text, 4)


def test_faults_parse_and_are_checked():
    assert parse_faults(["3:4", "0:1.5"], "straggler", 4, float) == {3: 4.0, 0: 1.5}
    with pytest.raises(InvalidArgument, match=r"worker must be in \[0, 4\)"):
        parse_faults(["4:2"], "straggler", 4, float)
    with pytest.raises(InvalidArgument, match="WORKER:VALUE"):
        parse_faults(["x"], "kill", 4, int)


def test_summary_reads_targets_staleness_and_rates_off_the_curve():
    cfg = CompareConfig(runs=(RunSpec("async", "async"),), target_accuracy=0.8)
    curve = [{"time": 0.0, "step": 0, "version": 0, "accuracy": 0.1, "loss": 2.0},
             {"time": 1.0, "step": 5, "version": 10, "accuracy": 0.85, "loss": 0.5},
             {"time": 2.0, "step": 9, "version": 18, "accuracy": 0.9, "loss": 0.4}]
    result = RunResult(RunSpec("async", "async"), None, curve, train_time=2.0, updates=18, bytes_moved=3_000_000,
                       staleness={0: 10, 1: 6, 3: 2})
    row = summarize(result, cfg)
    assert row["time_to_target"] == 1.0 and row["steps_to_target"] == 5
    assert row["final_accuracy"] == 0.9 and row["final_loss"] == 0.4
    assert row["mean_staleness"] == pytest.approx(12 / 18) and row["max_staleness"] == 3
    assert row["updates_per_s"] == 9.0 and row["mb_moved"] == 3.0
    assert "| async | ok | 1.0000 | 5 |" in table([row])


def test_a_target_never_reached_and_a_failed_run_are_reported_as_such():
    cfg = CompareConfig(runs=(RunSpec("sync", "sync"),), target_accuracy=0.99, target_loss=0.1)
    result = RunResult(RunSpec("sync", "sync"), "worker-1 exited with code 1",
                       [{"time": 1.0, "step": 1, "version": 1, "accuracy": 0.995, "loss": 0.5}])
    row = summarize(result, cfg)
    assert row["time_to_target"] is None and row["status"] == "failed: worker-1 exited with code 1"
