"""Network utilities for whole-system tests (loopback only)."""
