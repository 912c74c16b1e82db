"""`dendrite serve|generate`: vLLM's spellings translated into the absl flags underneath, the
help that lists them, and one generation through the console script; `--chat-template`'s
load option."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dendrite_jax.cli import CommandLineError, translate
from dendrite_jax.model.loader import chat_template_text, load_model
from dendrite_jax.model.tiny_checkpoints import write_tiny_gguf

# The flags a command line defines, as `translate` sees them: name -> boolean.
FLAGS = {name: False for name in (
    "model", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size",
    "kv_compression", "weights_dtype", "dtype", "api_key", "chat_template", "port", "host",
    "served_model_name", "revision", "seed", "max_tokens", "fp8_keep_layers", "prompt")}
FLAGS.update(enable_prefix_caching=True, allow_download=True, chat=True)


@pytest.mark.parametrize("args, expected", [
    (["Qwen/Qwen3-0.6B", "--max-model-len", "4096"],
     ["--model=Qwen/Qwen3-0.6B", "--max_model_len=4096"]),
    (["--max-num-seqs=16", "m"], ["--model=m", "--max_num_seqs=16"]),
    (["--max_num_seqs", "4", "--api_key=k"], ["--max_num_seqs=4", "--api_key=k"]),
    (["--max-num-batched-tokens", "256", "-tp", "2"],
     ["--max_num_batched_tokens=256", "--tensor_parallel_size=2"]),
    (["--enable-prefix-caching"], ["--enable_prefix_caching"]),
    (["--no-enable-prefix-caching"], ["--noenable_prefix_caching"]),
    (["--noenable_prefix_caching", "--allow-download"],
     ["--noenable_prefix_caching", "--allow_download"]),
    (["--enable-prefix-caching=false"], ["--enable_prefix_caching=false"]),
    (["--kv-cache-dtype", "auto"], ["--kv_compression=none"]),
    (["--kv-cache-dtype=turboquant-4"], ["--kv_compression=turboquant-4"]),
    (["--kv-cache-dtype", "fp8"], ["--kv_compression=fp8"]),
    (["--kv-cache-dtype=fp8_e4m3"], ["--kv_compression=fp8"]),
    (["--quantization", "fp8"], ["--weights_dtype=fp8"]),
    (["--quantization=fp8-channel"], ["--weights_dtype=fp8-channel"]),
    (["--dtype", "auto"], []),
    (["--dtype=float", "--seed", "3"], ["--dtype=float32", "--seed=3"]),
    (["--dtype", "bfloat16"], ["--dtype=bfloat16"]),
    (["--chat-template", "{{ messages }}"], ["--chat_template={{ messages }}"]),
    (["--served-model-name", "my-model", "--host=0.0.0.0", "--port", "8001"],
     ["--served_model_name=my-model", "--host=0.0.0.0", "--port=8001"]),
    (["--revision", "v2", "--fp8-keep-layers", "-1"], ["--revision=v2", "--fp8_keep_layers=-1"]),
    (["--prompt", "a = b", "--max-tokens=4", "--chat"],
     ["--prompt=a = b", "--max_tokens=4", "--chat"]),
    (["--flagfile=args.txt"], ["--flagfile=args.txt"]),
    (["--", "m"], ["--model=m"]),
])
def test_translate(args, expected):
    assert translate("serve", args, FLAGS) == expected


@pytest.mark.parametrize("args, error", [
    (["--gpu-memory-utilization", "0.9"], "use --kv-cache-bytes"),
    (["--kv-cache-dtype", "fp8_e5m2"], "the FP8 cache is E4M3"),
    (["--kv-cache-dtype=int4"], "not a KV cache dendrite keeps"),
    (["--quantization", "awq"], "to FP8 only"),
    (["--dtype", "float16"], "float32 or bfloat16"),
    (["--trust-remote-code"], r"unknown flag --trust-remote-code \(`dendrite serve --help`"),
    (["--no_such_flag=1"], "unknown flag --no_such_flag"),
    (["m1", "m2"], "takes one model"),
    (["m", "--model=x"], "given twice"),
    (["--port"], "--port needs a value"),
    (["--no-enable-prefix-caching=true"], "takes no value"),
])
def test_translate_refuses(args, error):
    with pytest.raises(CommandLineError, match=error):
        translate("serve", args, FLAGS)


def dendrite(*args, cache_dir):
    script = Path(sys.executable).parent / "dendrite"
    assert script.is_file(), "the console script is missing: pip install -e ."
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_dir))
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=600,
                          env=env)


def test_help(tmp_path):
    top = dendrite("--help", cache_dir=tmp_path)
    assert top.returncode == 0 and "serve" in top.stdout and "generate" in top.stdout
    serve = dendrite("serve", "--help", cache_dir=tmp_path)
    assert serve.returncode == 0, serve.stderr
    for flag in ("--tensor-parallel-size", "--max-model-len", "--max-num-seqs",
                 "--max-num-batched-tokens", "--[no-]enable-prefix-caching", "--kv-cache-dtype",
                 "--quantization", "--api-key", "--chat-template", "--served-model-name",
                 "--host", "--port", "--revision", "--[no-]allow-download",
                 "--gpu-memory-utilization"):
        assert flag in serve.stdout, flag
    bad = dendrite("serve", "--gpu-memory-utilization", "0.9", cache_dir=tmp_path)
    assert bad.returncode == 2 and "use --kv-cache-bytes" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_generate(tmp_path):
    out = dendrite("generate", "smollm2-135m", "--max-tokens", "4", "--prompt",
                   "The capital of France is", "--kv-cache-dtype=auto",
                   "--no-enable-prefix-caching", cache_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "4 tokens" in out.stderr


# ------------------------------------------------------------------ --chat-template (load)

def test_chat_template_replaces_the_models(tmp_path):
    gguf = str(write_tiny_gguf(tmp_path / "tiny.gguf"))
    messages = [{"role": "user", "content": "hi"}]
    text = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    loaded = load_model(gguf, "float32", chat_template=text)
    assert loaded.tokenizer.apply_chat_template(messages) == "[hi]"
    file = tmp_path / "template.jinja"
    file.write_text("<{{ messages[0]['role'] }}>")
    assert chat_template_text(str(file)) == "<{{ messages[0]['role'] }}>"
    loaded = load_model(gguf, "float32", chat_template=str(file))
    assert loaded.tokenizer.apply_chat_template(messages) == "<user>"
    with pytest.raises(ValueError, match="no such file, nor a Jinja template"):
        load_model(gguf, "float32", chat_template="missing.jinja")
    with pytest.raises(ValueError, match="chat template does not parse"):
        load_model(gguf, "float32", chat_template="{% for %}")
