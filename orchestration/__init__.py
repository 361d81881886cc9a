"""Orchestration: the programs built from the services: the distributed launcher (``System``), the run's
coordinator, the evaluator, the single-process trainer, the experiment runner, the cached demo/base-policy
pipeline and the benchmarks. Imports the services (learner, actors, replay, inference server) and the core;
only the CLIs import it."""
