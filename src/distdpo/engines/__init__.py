"""Engines supply communication to the algorithms: the in-process simulator (default), torchdist, flower."""
