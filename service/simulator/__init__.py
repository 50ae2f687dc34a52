"""A local stand-in for Monogoto's authentication API, both dialects (there is no sandbox).

Run it with `monogoto-broker simulator`; see docs/simulator.md for the control API.
"""

DEMO_USERNAME = "demo@monogoto.example"
DEMO_PASSWORD = "demo-password"  # noqa: S105 (a documented demo credential)

__all__ = ["DEMO_PASSWORD", "DEMO_USERNAME"]
