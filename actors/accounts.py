"""The executor's tenant accounting: limits and usage (`Ledger`), the scheduler's fair
share of slots, and the per-tenant metrics, kept in step (docs/tenants.md). Its jobs:
admit or refuse a plan by its tenant's limits, count the time a task queued, charge a
finished task's tokens, and report each tenant's figures.
"""

from __future__ import annotations

from typing import Any

from actors.metrics import metrics
from orchestration.config import ChorusConfig
from orchestration.errors import RateLimitedError
from orchestration.ledger import Ledger
from orchestration.models import ExecutionPlan, TaskResult
from orchestration.slots import SlotScheduler


class TenantAccounts:
    """Per tenant: the ledger's limits and usage, the scheduler's share, the metrics."""

    def __init__(self, config: ChorusConfig, slots: SlotScheduler) -> None:
        self.slots = slots
        self.ledger = Ledger(config.tenants)
        self.configure(config)

    def configure(self, config: ChorusConfig) -> None:
        """Tenants' limits, weights and caps, and whether the scheduler shares by tenant."""
        self.ledger.configure(config.tenants)
        self.slots.set_tenants({t.name: (t.weight, t.max_in_flight) for t in config.tenants})
        self.slots.set_fair_share(config.executor.fair_share)

    def admit(self, plan: ExecutionPlan) -> dict[str, str]:
        """The tenant's x-ratelimit-* headers, or RateLimitedError (counted, and its
        metric); a follow-up (a synthesis) belongs to a request admitted already."""
        try:
            ratelimit = (self.ledger.headers if plan.follow_up else self.ledger.admit)(plan.tenant)
        except RateLimitedError as exc:  # the ledger counted it; the metric, here
            self.refused(plan, exc.field or "rate_limited", counted=True)
            raise
        if not plan.follow_up:
            metrics().tenant_requests.inc(tags={"tenant": self.ledger.known(plan.tenant),
                                                "expert": plan.primary.expert})
        return ratelimit

    def refused(self, plan: ExecutionPlan, reason: str, counted: bool = False) -> None:
        if not counted:
            self.ledger.refuse(plan.tenant, reason)
        metrics().tenant_refusals.inc(tags={"tenant": self.ledger.known(plan.tenant),
                                            "expert": plan.primary.expert, "reason": reason})

    def queued(self, tenant: str, expert: str, waited_s: float) -> None:
        """A task of `tenant` got its slot on `expert` after `waited_s`."""
        tenant = self.ledger.known(tenant)
        self.ledger.queued(tenant, expert, waited_s)
        metrics().tenant_queue.observe(waited_s, tags={"tenant": tenant, "expert": expert})

    def charge(self, tenant: str, expert: str, result: TaskResult) -> None:
        """The engine's counts of a task (its answer's attempts' prompt and answer; a
        hedge that lost is not in them) to its tenant: its token window, its usage, and
        its weighted service in the scheduler."""
        prompt, out = result.prompt_tokens or 0, result.tokens
        self.ledger.charge(tenant, expert, prompt, out)
        self.slots.charge(tenant, out)  # the prompt was charged (estimated) at the grant
        tags = {"tenant": self.ledger.known(tenant), "expert": expert}
        for kind, count in (("in", prompt), ("out", out)):
            if count:  # a Ray counter takes positive increments only
                metrics().tenant_tokens.inc(count, tags={**tags, "kind": kind})

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per tenant: its usage and limits (the ledger), and its share now (the slots)."""
        shares = self.slots.tenant_stats()
        return {name: {**usage, **shares.get(name, {})}
                for name, usage in self.ledger.stats().items()}
