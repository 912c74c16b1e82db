"""Multi-device execution: tensor parallelism over a device mesh."""
