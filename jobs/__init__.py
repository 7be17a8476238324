"""Thin job entry points: parse a config, call one pipeline function (`python jobs/<job>.py`)."""
