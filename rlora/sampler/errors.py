"""Errors and warnings raised by the task sampler."""
from __future__ import annotations


class SamplerError(ValueError):
    """A user error in the sampler's input: the message is one line naming the field and the fix."""


class SamplerWarning(UserWarning):
    """Something was corrected automatically (e.g. explicit probabilities were re-normalised)."""
