"""Front ends over the engine: `LLM` (`llm`) and what every front end shares: prompts
(`prompts`), a prompt's request group and output (`groups`), streaming deltas (`streaming`)."""
