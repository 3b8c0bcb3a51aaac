"""Prompting: templates and verbalizers (``templates``), demonstrations, calibration,
zero-/few-shot evaluation runs (``evaluation``) and the scorers (``scorers``)."""
