"""Consistency modes as small pure policies: who waits, and when an update is applied.

A policy never touches state; the shard asks it questions about a `View` of its clocks.

* sync (BSP): pushes for step v are averaged and applied once every active worker has pushed;
  a pull for clock c waits until step c - 1 is applied (version >= c).
* async: every push is applied on arrival; pulls never wait.
* ssp(s): pushes applied on arrival; a pull at clock c waits until the slowest active worker's
  clock is >= c - s. s = 0 is lock-step without aggregation.

sync and ssp also wait, at start, until `num_workers` workers have registered (the quorum), so
the first worker cannot run ahead of workers that have not joined yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ps.errors import InvalidArgument


@dataclass(frozen=True)
class View:
    """What a policy may look at: applied updates, active workers' clocks, quorum reached."""

    version: int
    clocks: tuple[int, ...]
    quorum: bool

    @property
    def min_clock(self) -> int:
        return min(self.clocks) if self.clocks else self.version


class Verdict(Enum):
    APPLY = "apply"            # apply this push now
    ACCUMULATE = "accumulate"  # add it to the current sync step
    LATE = "late"              # its sync step is already applied: drop it
    AHEAD = "ahead"            # names a sync step that cannot have been pulled yet: refuse


@dataclass(frozen=True)
class Sync:
    """`backup` b: a step completes once all but b active workers have pushed for it (the
    slowest b are dropped for that step, as with TF's SyncReplicasOptimizer)."""

    backup: int = 0
    name = "sync"

    def join_clock(self, view: View) -> int:
        return view.version

    def pull_ready(self, clock: int, view: View) -> bool:
        return view.quorum and view.version >= clock

    def on_push(self, clock: int, view: View) -> Verdict:
        if clock < view.version:
            return Verdict.LATE
        if clock > view.version:
            return Verdict.AHEAD
        return Verdict.ACCUMULATE

    def step_ready(self, view: View, pushes: int) -> bool:
        done = sum(c > view.version for c in view.clocks)
        return view.quorum and pushes > 0 and done >= len(view.clocks) - self.backup


@dataclass(frozen=True)
class Async:
    name = "async"

    def join_clock(self, view: View) -> int:
        return view.min_clock if view.clocks else 0

    def pull_ready(self, clock: int, view: View) -> bool:
        return True

    def on_push(self, clock: int, view: View) -> Verdict:
        return Verdict.APPLY

    def step_ready(self, view: View, pushes: int) -> bool:
        return False


@dataclass(frozen=True)
class SSP:
    staleness: int
    name = "ssp"

    def __post_init__(self) -> None:
        if self.staleness < 0:
            raise InvalidArgument(f"staleness ({self.staleness}) must be >= 0")

    def join_clock(self, view: View) -> int:
        return view.min_clock if view.clocks else 0

    def pull_ready(self, clock: int, view: View) -> bool:
        return view.quorum and view.min_clock >= clock - self.staleness

    def on_push(self, clock: int, view: View) -> Verdict:
        return Verdict.APPLY

    def step_ready(self, view: View, pushes: int) -> bool:
        return False


Policy = Sync | Async | SSP


def make_policy(mode: str, staleness: int = 0, backup: int = 0) -> Policy:
    if mode == "sync":
        return Sync(backup)
    if mode == "async":
        return Async()
    if mode == "ssp":
        return SSP(staleness)
    raise InvalidArgument(f"mode ({mode!r}) must be one of sync, async, ssp")
