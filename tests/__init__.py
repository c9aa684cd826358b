"""The tests mirror the source tree: tests/strategies/, tests/fedapp/, tests/clients/ and
tests/scripts/ hold one test_<module>.py per module with tests (its example, property
and fuzz tests together); tests/runs/ holds the tests that start real Flower processes
(marked ``slow``: ``pytest -m "not slow"`` skips them); tests/test_layout.py and
tests/test_source_scan.py check the project as a whole. Shared fixtures are in
conftest.py, shared helpers in tests/helpers/; tests/examples/ and tests/faults/ are
Flower apps the runs use."""
