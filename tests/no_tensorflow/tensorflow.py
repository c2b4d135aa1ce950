"""Stands in for the real package in the daemon's process during tests: the
device half of edgernn must never import tensorflow."""

raise ImportError("tensorflow must not be imported by edgernnd (device code)")
