"""Coverage-guided fuzzing of the untrusted parsers (atheris), shared by tools/fuzz.py and tests/fuzz/."""
