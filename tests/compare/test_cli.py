"""`rlora compare` refuses bad flags in one line (exit 2) before anything is trained or written."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "compare_cpu.yaml"
SHARED = (REPO / "examples" / "configs" / "../../../shared/data").resolve()


@pytest.mark.parametrize("args,message", [
    (["--methods", "lora,foo"], "--methods 'lora,foo': use a comma-separated list of lora, hydra, rlora, mtl"),
    (["--methods", "lora,lora"], "--methods 'lora,lora' names a value twice"),
    (["--samplers", "greedy"], "--samplers 'greedy': use a comma-separated list of"),
    (["--methods", "hydra,mtl"], "--baseline lora is not among --methods hydra,mtl"),
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--n-boot", "5"], "--n-boot must be >= 100, got 5"),
    (["trainer.max_steps=0"], "trainer.max_steps must be >= 1, got 0"),
    (["--tune", "trainer.learning_rate=1e-3"], "--tune 'trainer.learning_rate=1e-3': use KEY=V1,V2[,...]"),
    (["--tune", "sampler.cap=10,20"], "--tune sampler.cap: sampler.cap changes the task sampling"),
    (["--val-rows", "50"], "--tune-steps and --val-rows only apply with --tune"),
    (["--val-rows", "100"], "--tune-steps and --val-rows only apply with --tune"),   # the default value too
    (["--sets", "mtl_gpu12_rest,nosuchset"], "--sets nosuchset: "),      # checked before mtl_gpu12_rest is built
    (["--sets", f"mtl_cpu6,{SHARED / 'mtl_cpu6'}"], f"names the set mtl_cpu6 twice (mtl_cpu6 and {SHARED / 'mtl_cpu6'})"),
    # the second set's carve is infeasible: refused before the first set is tuned or mtl_gpu12_rest built
    (["--sets", "mtl_cpu6,mtl_gpu12_rest", "--tune", "trainer.learning_rate=1e-3,3e-3", "--val-rows", "460"],
     "task arc_challenge of mtl_gpu12_rest has 919 training rows: --val-rows 460 would leave fewer than half"),
    (["--tune", "trainer.learning_rate=1e-3,3e-3", "--tune-steps", "0"], "--tune-steps must be >= 1, got 0"),
    (["--sets", "mtl_cpu6,nosuchset"], "--sets nosuchset: "),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, message):
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "rlora.cli", "compare", str(CONFIG), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()
