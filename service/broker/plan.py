"""The renewal plan: when each account's next renewal can be made on the shared auth budget,
and whether it comes in time (docs/broker.md, "Renewal planning").

A pure model, computed from what a process knows (each account's token and when it was last
read) and the budget's settings; it decides nothing, it predicts. Each account has a deadline,
its token's expiry minus `min_remaining_seconds` minus a safety margin. The budget grants at
most `limit` units in any window (a sliding log), so the plan gives each free unit, its slot, to
the renewal with the earliest deadline among those due (no renewal before its refresh point,
`fraction` of the lifetime). Every renewal gives a new token whose renewal comes in turn, until
every account's next renewal has its slot.

When the renewals do not all fit, the plan gives up as few accounts as it can: whenever a
renewal would come late, the account ranked last among those competing for the same units is
given up, idle ones (no read within two lifetimes) before used ones, the longest unread first.
The given-up accounts are planned after the others, in the slots left. Below capacity nobody
is given up, as the budget's queue gives nobody up. An account is at risk when its planned
renewal comes after its token is down to `min_remaining_seconds`: the deadline orders the
renewals with the safety margin to spare, the risk is counted without it.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

# The share of the deadline kept for the renewal itself: one upstream call, made when its slot
# comes, has to be done before the token is down to `min_remaining_seconds`.
SAFETY_MARGIN_SECONDS = 2.0
# An account not read within this many of its token's lifetimes is idle.
IDLE_LIFETIMES = 2.0
# Slots and deadlines compare with this tolerance (float sums of windows).
_EPSILON = 1e-6


@dataclass(frozen=True, slots=True)
class AccountInput:
    """One account as the plan sees it. Times are wall-clock seconds.

    `lifetime` is the current token's observed lifetime (a default when there is no token);
    `expires_at` until when the current token may be served (None without one, or once it was
    revoked); `last_read` when a caller was last served a token of it (0 if never).
    """

    name: str
    lifetime: float
    expires_at: float | None
    last_read: float = 0.0


@dataclass(frozen=True, slots=True)
class Budget:
    """The auth budget: `limit` upstream calls per `window_seconds`."""

    limit: int
    window_seconds: float

    @property
    def capacity(self) -> float:
        """Calls per second the budget sustains."""
        return self.limit / self.window_seconds


@dataclass(frozen=True, slots=True)
class Renewal:
    """One account's place in the plan."""

    name: str
    # When its token must have been renewed (no earlier than the plan's `now`).
    deadline: float
    # When its next renewal is planned.
    next_renewal_at: float
    # The planned renewal comes after the token is down to min_remaining (the deadline plus
    # the safety margin): callers will find no valid token.
    at_risk: bool
    # Read within the last two lifetimes.
    used: bool
    # Past capacity (utilisation above 1): one of the accounts the steady state cannot keep,
    # whose renewals and callers the budget's queue ranks after the others'.
    given_up: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    """Every account's renewal, and the load they put on the budget."""

    renewals: dict[str, Renewal]
    # Calls per second the accounts need in the long run (one per lifetime - min_remaining).
    load: float
    # Calls per second the budget grants.
    capacity: float

    @property
    def utilisation(self) -> float:
        """Planned load / capacity: above 1, the budget cannot keep every account renewed."""
        return self.load / self.capacity

    @property
    def at_risk(self) -> list[str]:
        """The accounts at risk, the earliest deadline first."""
        risky = [renewal for renewal in self.renewals.values() if renewal.at_risk]
        return [renewal.name for renewal in sorted(risky, key=lambda r: (r.deadline, r.name))]

    @property
    def fits(self) -> bool:
        """The load fits the capacity and every deadline is met."""
        return self.utilisation <= 1.0 and not any(r.at_risk for r in self.renewals.values())


def used_lately(last_read: float, lifetime: float | None, now: float) -> bool:
    """Whether an account read at `last_read` (0 if never) is in use: read within
    `IDLE_LIFETIMES` of its token's `lifetime` (None while it has no token: read at all)."""
    if last_read <= 0:
        return False
    return lifetime is None or now - last_read <= IDLE_LIFETIMES * lifetime


def refresh_offset(lifetime: float, fraction: float, min_remaining: float) -> float:
    """How long after it was obtained a token is due: at `fraction` of its lifetime, earlier if
    that would leave less than `min_remaining`, never before half that point (the broker's own
    refresh point, `TokenBroker.refresh_point`)."""
    fraction_point = fraction * lifetime
    return max(fraction_point / 2, min(fraction_point, lifetime - min_remaining))


def make_plan(
    accounts: Sequence[AccountInput],
    budget: Budget,
    *,
    min_remaining: float,
    fraction: float,
    now: float,
    margin: float = SAFETY_MARGIN_SECONDS,
) -> Plan:
    """The plan for `accounts` on `budget` as of `now`."""

    def calls(i: int) -> float:
        """Account `i`'s load: one call per lifetime - min_remaining, in calls per second."""
        return 1.0 / max(accounts[i].lifetime - min_remaining, _EPSILON)

    load = sum(calls(i) for i in range(len(accounts)))
    if not accounts:
        return Plan({}, load, budget.capacity)
    jobs = [_first_job(account, min_remaining, fraction, margin, now) for account in accounts]
    # The order in which accounts are kept: used before idle; among the idle, the most recently
    # read; among the used, by name alone, so that plans made seconds apart (the reads of used
    # accounts keep coming) give up the same accounts rather than new ones each time.
    keep_order = sorted(
        range(len(accounts)),
        key=lambda i: (
            not jobs[i].used,
            0.0 if jobs[i].used else -accounts[i].last_read,
            accounts[i].name,
        ),
    )
    keep_rank = [0] * len(accounts)
    for rank, i in enumerate(keep_order):
        keep_rank[i] = rank
    schedule = _Schedule(
        accounts,
        jobs,
        budget,
        min_remaining=min_remaining,
        fraction=fraction,
        margin=margin,
        now=now,
    )
    # Below capacity the budget's queue gives nobody up (a renewal late in the simulation is a
    # passing crowd, such as a cold start's logins), so neither does the plan that predicts it.
    over = load > budget.capacity + _EPSILON
    given_up = schedule.given_up(keep_rank) if over else set()
    slots = schedule.run(given_up)

    # The next renewals may all fit while the steady state cannot: past capacity, the accounts
    # ranked last are given up too, until the load of those kept fits (their tokens would run
    # out within a few lifetimes, whatever the next renewal does).
    unsustainable: set[int] = set()
    kept_load = load - sum(calls(i) for i in given_up)
    for i in reversed(keep_order):
        if not over or kept_load <= budget.capacity + _EPSILON:
            break
        if i not in given_up:
            unsustainable.add(i)
            kept_load -= calls(i)
    # The budget's queue ranks these after the others (`Renewal.given_up`).
    dropped = given_up | unsustainable
    renewals = {
        account.name: Renewal(
            name=account.name,
            deadline=job.deadline,
            next_renewal_at=slots[i],
            # A slot within the safety margin still leaves the call time to be done before
            # the token is down to min_remaining: late for the plan's order, not yet a risk.
            at_risk=slots[i] > job.deadline + margin + _EPSILON or i in unsustainable,
            used=job.used,
            given_up=i in dropped,
        )
        for i, (account, job) in enumerate(zip(accounts, jobs, strict=True))
    }
    return Plan(renewals, load, budget.capacity)


@dataclass(frozen=True, slots=True)
class _Job:
    release: float
    deadline: float
    used: bool


def _first_job(
    account: AccountInput, min_remaining: float, fraction: float, margin: float, now: float
) -> _Job:
    used = used_lately(account.last_read, account.lifetime, now)
    if account.expires_at is None or account.expires_at <= now:
        return _Job(release=now, deadline=now, used=used)
    obtained_at = account.expires_at - account.lifetime
    release = obtained_at + refresh_offset(account.lifetime, fraction, min_remaining)
    deadline = account.expires_at - min_remaining - margin
    return _Job(release=max(release, now), deadline=max(deadline, now), used=used)


class _Schedule:
    """Earliest-deadline-first on the budget's slots, kept accounts ahead of the others."""

    def __init__(
        self,
        accounts: Sequence[AccountInput],
        jobs: list[_Job],
        budget: Budget,
        *,
        min_remaining: float,
        fraction: float,
        margin: float,
        now: float,
    ) -> None:
        self._jobs = jobs
        self._limit = budget.limit
        self._window = budget.window_seconds
        self._now = now
        # Each account's renewal, once made, gives a token due again after `offset` and to be
        # renewed again by `span` after its slot.
        self._offset = [refresh_offset(a.lifetime, fraction, min_remaining) for a in accounts]
        self._span = [max(a.lifetime - min_remaining - margin, 0.0) for a in accounts]
        # Renewals due after this are not planned: every account's next one is before it.
        self._horizon = max(job.deadline for job in jobs)

    def given_up(self, keep_rank: list[int]) -> set[int]:
        """The accounts to give up so that every other account's next renewal meets its
        deadline: as few as possible, the last in `keep_rank` first.

        Earliest-deadline-first, and whenever a renewal would come late, the account ranked
        last among it and those renewed since the budget was last idle for a whole window is
        given up, until it comes in time; the units freed go to the renewals after (Moore and
        Hodgson's rule for the fewest late jobs, here an approximation: the plan itself is
        then made again with those accounts given up).
        """
        jobs = self._jobs
        waiting = [(job.release, job.deadline, i) for i, job in enumerate(jobs)]
        heapq.heapify(waiting)
        ready: list[tuple[int, float, int]] = []
        # The accounts whose next renewal was made since the budget was last idle, the last
        # kept on top.
        busy: list[tuple[int, int]] = []
        given_up: set[int] = set()
        planned = [False] * len(jobs)
        used = [0 if job.used else 1 for job in jobs]
        taken: list[float] = []
        slot = self._now
        limit, window = self._limit, self._window
        horizon, offset, span = self._horizon, self._offset, self._span
        while waiting or ready:
            if len(taken) >= limit:
                slot = max(slot, taken[-limit] + window)
            if not ready and waiting[0][0] > slot:
                slot = waiting[0][0]  # the budget is idle until then
                if taken and slot >= taken[-1] + window:
                    busy.clear()  # a whole window idle: earlier renewals no longer matter
            while waiting and waiting[0][0] <= slot + _EPSILON:
                _, deadline, i = heapq.heappop(waiting)
                heapq.heappush(ready, (used[i], deadline, i))
            _, deadline, i = heapq.heappop(ready)
            if i in given_up:
                continue
            if not planned[i]:
                planned[i] = True
                heapq.heappush(busy, (-keep_rank[i], i))
                while slot > deadline + _EPSILON:
                    _, worst = heapq.heappop(busy)
                    given_up.add(worst)
                    if worst == i or not taken:
                        break  # its unit goes to the next renewal
                    # Every renewal since that of `worst` moves up one unit: this one takes
                    # the last unit taken (not before it is due).
                    slot = max(taken.pop(), jobs[i].release)
                if i in given_up:
                    continue
            release = slot + offset[i]
            if release <= horizon:
                heapq.heappush(waiting, (release, slot + span[i], i))
            taken.append(slot)
        return given_up

    def run(self, given_up: set[int]) -> list[float]:
        """Each account's next slot, the `given_up` accounts planned only once the others'
        renewals are."""
        jobs = self._jobs
        kept = [i for i in range(len(jobs)) if i not in given_up]
        # Renewals not yet due: (release, deadline, account); then those due, by deadline.
        waiting = [(jobs[i].release, jobs[i].deadline, i) for i in kept]
        heapq.heapify(waiting)
        later = sorted(given_up)
        ready: list[tuple[int, float, int]] = []
        used = [0 if job.used else 1 for job in jobs]
        first: list[float | None] = [None] * len(jobs)
        # The slots given so far: at most `limit` in any window, none before now.
        taken: list[float] = []
        slot = self._now
        limit, window = self._limit, self._window
        horizon, offset, span = self._horizon, self._offset, self._span
        while True:
            if not waiting and not ready:
                if not later:
                    break
                # The kept accounts' renewals are all planned: the others get what is left.
                waiting = [(jobs[i].release, jobs[i].deadline, i) for i in later]
                heapq.heapify(waiting)
                later = []
            if len(taken) >= limit:
                slot = max(slot, taken[-limit] + window)
            if not ready:
                slot = max(slot, waiting[0][0])
            while waiting and waiting[0][0] <= slot + _EPSILON:
                _, deadline, i = heapq.heappop(waiting)
                heapq.heappush(ready, (used[i], deadline, i))
            _, _, i = heapq.heappop(ready)
            if first[i] is None:
                first[i] = slot
            # The renewal gives a new token; its own renewal is planned if it comes before
            # every account's next one is (it competes with them for the budget).
            release = slot + offset[i]
            if release <= horizon:
                heapq.heappush(waiting, (release, slot + span[i], i))
            taken.append(slot)
        return [at if at is not None else self._now for at in first]
