"""Helpers the tests import (tiny models, reference implementations, subprocess wrappers)."""
