"""CPUs with AMX: llama.cpp's AMX weight repacking segfaults on ATM's quantized tiny model.

On an Intel Xeon with amx_int8, the first decode of atm:q8 / atm:q4 died with SIGSEGV, in process
and in llama-server, until repacking was turned off (atm.export.llamacpp.no_amx_repack). These
tests decode in a child process, so a crash is a failure and not the end of the test run; on a CPU
without AMX they check the same path (nothing to turn off).
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from atm.export import llamacpp
from atm.runtime.llama_server import LlamaServer, command

DECODE = """
import sys
from atm.runtime.llamacpp import LlamaCppRunner
r = LlamaCppRunner(sys.argv[1], n_ctx=256, threads=1)
out = r.generate(r.tokenize("Advice:", add_bos=True), max_tokens=8)
print("decoded", bool(out))
"""


def test_server_args_follow_the_cpu(monkeypatch):
    monkeypatch.setenv("ATM_CPU_FLAGS", "avx2 avx512f avx512_vnni amx_tile amx_int8 amx_bf16")
    assert llamacpp.server_args() == ["--no-repack"]
    assert "--no-repack" in command("m.gguf", port=1, alias="a", exe="llama-server")
    monkeypatch.setenv("ATM_CPU_FLAGS", "avx2 fma f16c")
    assert llamacpp.server_args() == [] and "--no-repack" not in command("m.gguf", port=1, alias="a",
                                                                            exe="llama-server")


@pytest.mark.parametrize("tag", ["q8", "q4"])
def test_quantized_tiny_model_decodes_in_process(tiny_gguf, tag):
    path = next(e for e in tiny_gguf if e.tag == tag).path
    proc = subprocess.run([sys.executable, "-c", DECODE, path], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode} (-11: SIGSEGV)\n{proc.stderr[-2000:]}"
    assert "decoded True" in proc.stdout


@pytest.mark.native
def test_quantized_tiny_model_decodes_in_llama_server(tiny_gguf, tmp_path):
    path = next(e for e in tiny_gguf if e.tag == "q8").path
    with LlamaServer(path, name="amx", log_dir=tmp_path, alias="amx", threads=1) as srv:
        r = httpx.post(f"{srv.url}/completion", json={"prompt": "Advice:", "n_predict": 8}, timeout=120,
                       headers=srv.headers)
        assert r.status_code == 200 and srv.process.returncode is None
