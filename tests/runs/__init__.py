"""Tests that start real Flower processes (simulations, deployments): all marked
``slow``."""
