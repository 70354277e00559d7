"""The public API of fastfuse/__init__.py resolves, and importing fastfuse alone stays light."""
import subprocess
import sys

import fastfuse


def test_every_exported_name_resolves():
    for name in fastfuse.__all__:
        assert getattr(fastfuse, name) is not None, name


def test_import_does_not_pull_in_torch():
    code = "import sys, fastfuse; fastfuse.align_offsets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
