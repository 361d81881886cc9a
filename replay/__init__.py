"""Replay service: Reverb tables for online and demo transitions, actor-side writers, learner-side batches."""
