"""Each schedule's learning-rate sequence, stepped with its own cadence."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from stable_cnn.config import (
    CosineConfig,
    OneCycleConfig,
    PlateauConfig,
    SchedulerConfig,
    StepConfig,
)
from stable_cnn.training.schedulers import WarmupCosine, build_schedule

PEAK = 0.1


def lr_trace(config: SchedulerConfig, epochs: int, steps: int, val_accs=None) -> list[list[float]]:
    """Drive a schedule as the training loop does; returns the LR of every step, per epoch."""
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=PEAK, momentum=0.9)
    schedule = build_schedule(optimizer, config, epochs, steps)
    trace, global_step = [], 0
    for epoch in range(epochs):
        lrs = []
        for _ in range(steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            global_step += 1
            schedule.after_optimizer_step(global_step)
        schedule.after_epoch(epoch + 1, val_accs[epoch] if val_accs else 50.0)
        trace.append(lrs)
    return trace


def test_cosine_per_epoch_is_torchs_cosine_annealing_held_for_each_epoch():
    trace = lr_trace(CosineConfig(interval="epoch", warmup_epochs=0), epochs=6, steps=3)
    for epoch, lrs in enumerate(trace):
        want = PEAK * 0.5 * (1 + math.cos(math.pi * epoch / 6))
        assert lrs == pytest.approx([want] * 3)


def test_cosine_per_step_with_warmup_rises_then_decays_to_eta_min():
    trace = lr_trace(
        CosineConfig(interval="step", warmup_epochs=1, eta_min=0.001), epochs=4, steps=10
    )
    flat = [lr for lrs in trace for lr in lrs]
    warmup, decay = flat[:10], flat[10:]
    assert warmup == sorted(warmup) and warmup[0] < PEAK / 5
    assert decay[0] == pytest.approx(PEAK)
    assert all(a > b for a, b in itertools.pairwise(decay))
    assert decay[-1] == pytest.approx(0.001, abs=0.001)


def test_plateau_cuts_the_lr_only_after_patience_epochs_without_better_val_acc():
    accs = [50, 60, 70, 70, 70, 70, 70, 70]  # improves, then stalls from epoch 3
    trace = lr_trace(PlateauConfig(factor=0.5, patience=2), epochs=8, steps=2, val_accs=accs)
    firsts = [lrs[0] for lrs in trace]
    assert firsts[:6] == pytest.approx([PEAK] * 6)
    assert firsts[6] == pytest.approx(PEAK / 2)


def test_plateau_keeps_the_lr_while_val_acc_climbs():
    trace = lr_trace(PlateauConfig(patience=0), epochs=5, steps=1, val_accs=[10, 20, 30, 40, 50])
    assert [lrs[0] for lrs in trace] == pytest.approx([PEAK] * 5)


def test_step_multiplies_by_gamma_every_step_size_epochs():
    trace = lr_trace(StepConfig(step_size=2, gamma=0.1), epochs=5, steps=2)
    assert [lrs[0] for lrs in trace] == pytest.approx(
        [PEAK, PEAK, PEAK / 10, PEAK / 10, PEAK / 100]
    )


def test_onecycle_warms_up_to_peak_then_anneals_per_step():
    config = OneCycleConfig(pct_start=0.25, div_factor=25, final_div_factor=1e4)
    flat = [lr for lrs in lr_trace(config, epochs=4, steps=25) for lr in lrs]
    assert flat[0] == pytest.approx(PEAK / 25)
    assert max(flat) == pytest.approx(PEAK, rel=1e-3)
    assert flat.index(max(flat)) == pytest.approx(25, abs=1)
    assert flat[-1] < PEAK / 25 / 1e3


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_onecycle_keeps_the_optimizers_momentum_unless_asked_to_cycle_it(momentum):
    """OneCycleLR cycles momentum by default: optimizer.momentum=0 got momentum back."""
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=PEAK, momentum=momentum)
    schedule = build_schedule(optimizer, OneCycleConfig(), 2, 10)
    seen = set()
    for step in range(1, 20):
        optimizer.step()
        schedule.after_optimizer_step(step)
        seen.add(optimizer.param_groups[0]["momentum"])
    assert seen == {momentum}

    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=PEAK, momentum=momentum)
    cycled = OneCycleConfig(cycle_momentum=True, base_momentum=0.8, max_momentum=0.9)
    schedule = build_schedule(optimizer, cycled, 2, 10)
    trace = []
    for step in range(1, 20):
        optimizer.step()
        schedule.after_optimizer_step(step)
        trace.append(optimizer.param_groups[0]["momentum"])
    assert min(trace) == pytest.approx(0.8, abs=1e-3) and max(trace) <= 0.9 + 1e-9


def test_none_keeps_the_lr_constant():
    trace = lr_trace(SchedulerConfig(name="none"), epochs=3, steps=4)
    assert {lr for lrs in trace for lr in lrs} == {PEAK}


def torch_trace(make_scheduler, epochs: int, steps: int, per_step: bool) -> list[tuple]:
    """The (rate, momentum) of every step under a torch scheduler, as versions before
    the schedules became functions of the step ran them (and saved them)."""
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=PEAK, momentum=0.9)
    scheduler, trace = make_scheduler(optimizer), []
    for _ in range(epochs):
        for _ in range(steps):
            group = optimizer.param_groups[0]
            trace.append((group["lr"], group["momentum"]))
            optimizer.step()
            if per_step:
                scheduler.step()
        if not per_step:
            scheduler.step()
    return trace


def our_trace(config: SchedulerConfig, epochs: int, steps: int) -> list[tuple]:
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=PEAK, momentum=0.9)
    schedule, trace, global_step = build_schedule(optimizer, config, epochs, steps), [], 0
    for epoch in range(1, epochs + 1):
        for _ in range(steps):
            group = optimizer.param_groups[0]
            trace.append((group["lr"], group["momentum"]))
            optimizer.step()
            global_step += 1
            schedule.after_optimizer_step(global_step)
        schedule.after_epoch(epoch, 50.0)
    return trace


def test_each_schedule_gives_the_rates_torchs_scheduler_gave_older_versions():
    """A checkpoint of an older version saved torch's scheduler; today's rate comes from
    the step count. Both agree at every step, bit for bit where torch computes in
    closed form (cosine, OneCycle), so an old run resumes on the rate it left."""
    lambda_lr = torch.optim.lr_scheduler.LambdaLR
    cosine = CosineConfig(interval="step", warmup_epochs=1, eta_min=0.001)
    by_torch = torch_trace(
        lambda o: lambda_lr(o, WarmupCosine(40, 10, 0.001 / PEAK)), 4, 10, per_step=True
    )
    assert our_trace(cosine, 4, 10) == by_torch
    cosine = CosineConfig(interval="epoch", warmup_epochs=0)
    by_torch = torch_trace(lambda o: lambda_lr(o, WarmupCosine(5, 0, 0.0)), 5, 3, per_step=False)
    assert our_trace(cosine, 5, 3) == by_torch
    cycled = OneCycleConfig(cycle_momentum=True, base_momentum=0.8, max_momentum=0.9)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR
    by_torch = torch_trace(
        lambda o: one_cycle(
            o,
            max_lr=[PEAK],
            total_steps=30,
            pct_start=cycled.pct_start,
            div_factor=cycled.div_factor,
            final_div_factor=cycled.final_div_factor,
            base_momentum=0.8,
            max_momentum=0.9,
        ),
        3,
        10,
        per_step=True,
    )
    assert our_trace(cycled, 3, 10) == by_torch
    stepped = StepConfig(step_size=2, gamma=0.5)
    by_torch = torch_trace(
        lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5), 7, 2, per_step=False
    )
    ours = our_trace(stepped, 7, 2)  # torch multiplies step by step: the last bit may differ
    assert [lr for lr, _ in ours] == pytest.approx([lr for lr, _ in by_torch], rel=1e-12)
