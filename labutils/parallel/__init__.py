"""Parallelisms of lab2 and lab3, one module each (see the README's layout section)."""
