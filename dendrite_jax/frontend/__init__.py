"""Front ends over the engine: `LLM` (`llm`) and what it shares with the data-parallel replicas
(`prompts`)."""
