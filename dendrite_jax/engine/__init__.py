"""The engine: sampling, step plans, the jitted step runner, the scheduler and the step loop."""
