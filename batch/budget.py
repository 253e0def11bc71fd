"""Money: how many uploads a run may still start, and the balance check before it starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from batch.ledger.workers import WorkerRecords


class Allowance(Protocol):
    by_balance: bool

    def reserve(self) -> bool: ...

    def settle(self, charged: bool) -> None: ...

    @property
    def exhausted(self) -> bool: ...


@dataclass
class Budget:
    """Uploads this run may still start. Each upload that may be charged (accepted, or answer
    lost) uses one; an upload that provably cost nothing gives its unit back."""

    left: int
    #: The limit comes from the account balance (running out is then an account-level stop).
    by_balance: bool = False
    reserved: int = 0
    #: Uploads it let through that may have been charged.
    spent: int = 0

    def reserve(self) -> bool:
        if self.left - self.reserved <= 0:
            return False
        self.reserved += 1
        return True

    def settle(self, charged: bool) -> None:
        self.reserved -= 1
        if charged:
            self.left -= 1
            self.spent += 1

    @property
    def exhausted(self) -> bool:
        return self.left - self.reserved <= 0


class BatchBudget:
    """``--max-credits`` for a batch several workers share: one count in the ledger, taken and
    given back atomically, so the workers together start at most that many paid uploads."""

    by_balance = False

    def __init__(self, records: WorkerRecords) -> None:
        self.records = records

    def reserve(self) -> bool:
        return self.records.take_budget(1)

    def settle(self, charged: bool) -> None:
        if not charged:
            self.records.take_budget(-1)

    @property
    def exhausted(self) -> bool:
        left = self.records.budget_left()
        return left is not None and left <= 0


@dataclass(frozen=True)
class Estimate:
    images_to_pay: int
    credits_needed: float
    balance: float | None

    @property
    def short(self) -> bool:
        return self.balance is not None and self.balance < self.credits_needed

    def affordable(self, credits_per_image: float) -> int:
        if self.balance is None:
            return self.images_to_pay
        return max(0, int(self.balance // credits_per_image))

    def describe(self) -> str:
        text = (f"{self.images_to_pay} image(s) to pay for, about {self.credits_needed:g} "
                "credit(s)")
        if self.balance is not None:
            text += f"; the account has {self.balance:g}"
        return text
