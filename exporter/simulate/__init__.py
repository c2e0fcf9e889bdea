"""The simulated ZenMux API and the demo traffic generator, for tests, the demo, benchmarks and staging."""

from exporter.simulate.api import Faults, SimConfig, SimulatedZenMux, serve, totals

__all__ = ["Faults", "SimConfig", "SimulatedZenMux", "serve", "totals"]
