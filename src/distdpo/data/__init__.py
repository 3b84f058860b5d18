"""Preference data: the synthetic personalized model and (later) text loaders."""
