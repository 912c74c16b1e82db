"""The model: params pytree, pure forward functions, checkpoint loading, tokenizer."""
