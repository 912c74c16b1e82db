"""Multi-device front ends: data-parallel replicas of `LLM` (`replicas`) and joining a multi-host
job (`distributed`). Tensor parallelism belongs to the model (`model.tensor_parallel`)."""
