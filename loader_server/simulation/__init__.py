"""The fleet logic at scale, simulated: many loader hosts and trainer ranks in one process.

The real pure logic runs (the server's sessions and sampling plan, the client's fail-over plan
and balanced merge); the clock, the network and the worker processes are simulated. See
`fleet` for the scenario and the checks, `loader-server simulate --help` for the command.
"""

from .fleet import FleetResult, FleetSpec, simulate

__all__ = ["FleetResult", "FleetSpec", "simulate"]
