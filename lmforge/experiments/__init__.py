"""Experiments that chain several runs (the growth experiment behind `lmforge demo`)."""
