"""Money: how many uploads a run may still start, and the balance check before it starts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Budget:
    """Uploads this run may still start. Each upload that may be charged (accepted, or answer
    lost) uses one; an upload that provably cost nothing gives its unit back."""

    left: int
    #: The limit comes from the account balance (running out is then an account-level stop).
    by_balance: bool = False
    reserved: int = 0

    def reserve(self) -> bool:
        if self.left - self.reserved <= 0:
            return False
        self.reserved += 1
        return True

    def settle(self, charged: bool) -> None:
        self.reserved -= 1
        if charged:
            self.left -= 1

    @property
    def exhausted(self) -> bool:
        return self.left - self.reserved <= 0


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
