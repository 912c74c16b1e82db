"""The model: params pytree, pure forward functions, checkpoint loading, tokenizer, tensor-parallel
sharding of its pytrees, and the KV means a compressed cache is centred on (calibration)."""
