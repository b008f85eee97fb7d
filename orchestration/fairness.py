"""Per-tenant fair share for `SlotScheduler`: weights, hard caps, virtual counters.

Virtual Token Counter (Sheng et al., OSDI 2024, "Fairness in Serving Large Language
Models"): a tenant's counter is the service it received divided by its weight, and among
waiters of equal rank the tenant with the least counter goes first. A grant adds the
caller's cost estimate at once; `charge` adds the engine's real count when the task ends.
Counters never decrease. A tenant that becomes active (something waiting or in flight)
is lifted to the least counter of the other active tenants, or, if none is active, to the
counter of the last tenant that went idle (the paper's "last client left"): idling never
banks credit to spend in a burst later.

Only configured or active tenants are kept: an unconfigured tenant's counter goes when it
goes idle (on its return it is lifted like anyone else), so nothing grows with the number
of tenant names ever seen.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from orchestration.tenants import DEFAULT_TENANT

__all__ = ["DEFAULT_TENANT", "TenantPolicy", "TenantShares"]


@dataclass(frozen=True)
class TenantPolicy:
    weight: float = 1.0  # its share of a contended expert against others at the same rank
    max_in_flight: int | None = None  # granted slots at once, a hard cap; None: no cap


_UNCONFIGURED = TenantPolicy()


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]  # no entry for a tenant with nothing: the keys are the active set


class TenantShares:
    """Who is owed what: one ledger per scheduler, updated at every arrival and grant."""

    def __init__(self) -> None:
        self.policies: dict[str, TenantPolicy] = {}
        self.service: dict[str, float] = {}  # weighted service received (the VTC counter)
        self.in_flight: Counter[str] = Counter()  # granted, not yet released
        self.waiting: Counter[str] = Counter()  # waiting (parked ones included)
        self._floor = 0.0  # the counter of the last tenant to go idle with nobody active

    # ------------------------------------------------------------------ configuration

    def configure(self, tenants: dict[str, tuple[float, int | None]]) -> None:
        """Replace every tenant's (weight, max_in_flight); unknown tenants get 1, no cap."""
        policies: dict[str, TenantPolicy] = {}
        for name, (weight, cap) in tenants.items():
            if not weight > 0:
                raise ValueError(f"tenant {name!r}: weight must be > 0, not {weight!r}")
            if cap is not None and cap < 0:
                raise ValueError(f"tenant {name!r}: max_in_flight must be >= 0, not {cap!r}")
            policies[name] = TenantPolicy(float(weight), cap)
        self.policies = policies
        for name in list(self.service):  # a tenant dropped from the config keeps nothing
            self._forget_if_idle(name)

    def policy(self, tenant: str) -> TenantPolicy:
        return self.policies.get(tenant, _UNCONFIGURED)

    # ------------------------------------------------------------------ queries

    def counter(self, tenant: str) -> float:
        return self.service.get(tenant, 0.0)

    def is_active(self, tenant: str) -> bool:
        return tenant in self.waiting or tenant in self.in_flight

    def active(self) -> set[str]:
        return self.waiting.keys() | self.in_flight.keys()

    def is_full(self, tenant: str) -> bool:
        """At its hard cap: its waiters are skipped until one of its grants is released."""
        cap = self.policy(tenant).max_in_flight
        return cap is not None and self.in_flight[tenant] >= cap

    def stats(self) -> dict[str, dict[str, float | int | None]]:
        return {name: {"in_flight": self.in_flight[name], "waiting": self.waiting[name],
                       "service": round(self.counter(name), 3),
                       "weight": self.policy(name).weight,
                       "max_in_flight": self.policy(name).max_in_flight}
                for name in sorted(self.policies.keys() | self.active())}

    # ------------------------------------------------------------------ a waiter's life

    def arrive(self, tenant: str) -> None:
        """A new waiter; a tenant becoming active is lifted first (no banked credit)."""
        if not self.is_active(tenant):
            others = [self.counter(name) for name in self.active()]
            floor = min(others) if others else self._floor
            self.service[tenant] = max(self.counter(tenant), floor)
        self.waiting[tenant] += 1

    def withdraw(self, tenant: str) -> None:
        _decrement(self.waiting, tenant)
        self._maybe_idle(tenant)

    def grant(self, tenant: str, cost: int) -> None:
        """Charged at the grant with the caller's estimate, so a flood is paid for at once."""
        _decrement(self.waiting, tenant)
        self.in_flight[tenant] += 1
        self._add(tenant, cost)

    def release(self, tenant: str) -> None:
        _decrement(self.in_flight, tenant)
        self._maybe_idle(tenant)

    def charge(self, tenant: str, tokens: float) -> None:
        """Weighted service measured later (the engine's count); negative is ignored.

        An unconfigured tenant that is idle again has no counter to add to (it was
        dropped, and its return is lifted anyway), so its late charge is ignored too.
        """
        if tokens > 0 and (tenant in self.policies or self.is_active(tenant)):
            self._add(tenant, tokens)

    # ------------------------------------------------------------------ internals

    def _add(self, tenant: str, amount: float) -> None:
        self.service[tenant] = self.counter(tenant) + amount / self.policy(tenant).weight

    def _maybe_idle(self, tenant: str) -> None:
        if self.is_active(tenant):
            return
        if not self.active():  # the last one out: whoever arrives next starts from here
            self._floor = max(self._floor, self.counter(tenant))
        self._forget_if_idle(tenant)

    def _forget_if_idle(self, tenant: str) -> None:
        if tenant not in self.policies and not self.is_active(tenant):
            self.service.pop(tenant, None)
