"""The launcher's accelerator detection (what `setup` installs PyTorch for), with fake vendor tools on PATH."""
import os
import subprocess

from conftest import ROOT

LAUNCHER = os.path.join(ROOT, "refrag_quickstart_auto_accel.sh")


def detect(tmp_path, tools: dict, **env):
    """`refrag_quickstart_auto_accel.sh detect` with fake `tools` (name -> shell script body) first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in tools.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k != "ACCEL"}
    out = subprocess.run(["bash", LAUNCHER, "detect"], env=dict(clean, PATH=f"{bin_dir}:{clean['PATH']}", **env),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_detects_cuda_rocm_and_the_override(tmp_path):
    assert detect(tmp_path, {"nvidia-smi": 'echo "GPU 0: NVIDIA H100 (UUID: GPU-1)"'}) == "cuda"
    # a multi-GPU node's rocminfo prints far more than a pipe buffer; `grep -q` stopped early, rocminfo died of
    # SIGPIPE and, under pipefail, the machine was taken for a CPU one
    big = "i=0; while [ $i -lt 3000 ]; do echo \"  Marketing Name: AMD Instinct MI250X ($i) padding padding\"; " \
          "i=$((i+1)); done; echo '  Name: gfx90a'; i=0; while [ $i -lt 3000 ]; do echo padding; i=$((i+1)); done"
    assert detect(tmp_path / "r", {"rocminfo": big, "nvidia-smi": "exit 9"}) == "rocm"  # (a host GPU hidden)
    assert detect(tmp_path / "n", {"nvidia-smi": "exit 9"}, ACCEL="mps") == "mps"
