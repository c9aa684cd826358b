"""Tests of the fedapp package, one file per module."""
