"""A faithful local stand-in for the remote API: a real HTTP server on loopback.

It shares nothing with the client except :mod:`batch.apispec`.
"""

from batch.emulator.server import Emulator
from batch.emulator.state import EmulatorConfig, Faults

__all__ = ["Emulator", "EmulatorConfig", "Faults"]
