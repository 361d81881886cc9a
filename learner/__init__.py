"""The JAX learner: CSIL++ agents, pretraining, the fused update, checkpointing and weight publishing."""
