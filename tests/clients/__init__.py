"""Tests of the clients package, one file per module."""
