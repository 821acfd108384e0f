"""The embedded demo: a procedural picture world and the tiny model trained on it."""
