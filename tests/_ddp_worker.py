"""torchrun entry for test_ddp: runs examples/ddp_step.py's main, then leaves without interpreter
teardown. With torch 2.13 on CPU, gloo's worker threads outlive destroy_process_group and abort
the process at interpreter exit in a few percent of runs ("terminate called without an active
exception"), after all the work is done; os._exit skips that teardown so the test checks our
gradients, not gloo's shutdown."""
import os
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "ddp_step.py"))
    example["main"](sys.argv[-1], how="fsdp" if "--fsdp" in sys.argv else "ddp")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
