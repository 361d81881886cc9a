"""Replay service: the Reverb table of online transitions, actor-side writers, learner-side batches."""
