"""The ``interpreter`` marker: tests that run the Triton kernels, on CPU under ``TRITON_INTERPRET=1``.

Triton decides between interpreter and compiler when a function is decorated, so the variable must be
set before ``triton`` is first imported -- one process has either interpreted or compiled kernels,
never both. A run therefore has two sessions (a plugin registered by ``conftest.py``):

* the main session (``python -m pytest tests``, no ``TRITON_INTERPRET``): the kernels compiled (the AOT
  compile tests need that; ``impl="auto"`` keeps the torch path on CPU). The ``interpreter`` tests it
  selected go to ONE child pytest with ``TRITON_INTERPRET=1`` that starts with the test loop and runs
  beside it at a lower priority; they are moved to the end, and each one's reports come back from the
  child as it would have reported here (counted, ``-x``, ``--durations``, ``-v``). One the child did not
  report fails.
  On a CUDA machine the kernels run compiled on the GPU, in the main session, and there is no child.
* the interpreter session (``TRITON_INTERPRET=1 python -m pytest -m interpreter``, the inner loop for
  kernel work; the child runs as one, limited to the node ids the main session sent it).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

MARK = "interpreter"
ITEMS_ENV = "FASTFUSE_INTERPRETER_ITEMS"        # the child's node ids, one a line
REPORTS_ENV = "FASTFUSE_INTERPRETER_REPORTS"    # where the child writes its reports, JSON lines
CHILD_TIMEOUT_S = 3600.0
CHILD_NICENESS = 10


def interpreting() -> bool:
    """``TRITON_INTERPRET`` as ``fastfuse.loss.checks`` reads it."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_interpreted() -> bool:
    """fastfuse's kernels were decorated for the interpreter in this process."""
    try:
        import fastfuse.kernels.fused_ce as fc
    except ImportError:
        return False
    return type(fc.fused_ce_kernel).__name__ == "InterpretedFunction"


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def plugin(config: pytest.Config):
    return InterpreterSession(config) if interpreting() else MainSession(config)


class InterpreterSession:
    """``TRITON_INTERPRET=1``: as the main session's child, run exactly the tests it named and send back
    every report; run directly, the selection is the user's (``-m interpreter``)."""

    def __init__(self, config: pytest.Config):
        self.config = config
        items = os.environ.pop(ITEMS_ENV, None)       # popped: a pytest a test starts is not a child
        reports = os.environ.pop(REPORTS_ENV, None)
        self.wanted = set(Path(items).read_text().splitlines()) if items else None
        self.out = open(reports, "a", encoding="utf-8") if reports else None

    def pytest_report_header(self):
        if self.wanted is None:
            return f"TRITON_INTERPRET=1: the kernels are interpreted here; select the `{MARK}` tests " \
                   f"(-m {MARK}): the others expect compiled Triton"
        return None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if self.wanted is None:
            return
        drop = [i for i in items if i.nodeid not in self.wanted]
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = [i for i in items if i.nodeid in self.wanted]

    def pytest_runtest_logreport(self, report):
        if self.out is not None:
            data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
            self.out.write(json.dumps(data) + "\n")
            self.out.flush()

    def pytest_unconfigure(self):
        if self.out is not None:
            self.out.close()


class MainSession:
    """No ``TRITON_INTERPRET``: the selected ``interpreter`` tests run in one child session."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.items: list[pytest.Item] = []
        self.ids: set[str] = set()
        self.dir: Path | None = None
        self.child: subprocess.Popen | None = None
        self.started = 0.0
        self.reports: dict[str, list] | None = None
        self.note = ""
        self.first_missing = ""

    @pytest.hookimpl(trylast=True)                # after -k/-m/--deselect: only what this run selected
    def pytest_collection_modifyitems(self, items):
        marked = [i for i in items if i.get_closest_marker(MARK)]
        if not marked or _cuda():
            return
        if hasattr(self.config, "workerinput"):     # a pytest-xdist worker: each would start its own child
            raise pytest.UsageError(f"the `{MARK}` tests run in one TRITON_INTERPRET=1 session: deselect them "
                                    f"(-m 'not {MARK}') with -n, or run them with TRITON_INTERPRET=1 -m {MARK}")
        self.items, self.ids = marked, {i.nodeid for i in marked}
        items[:] = [i for i in items if i.nodeid not in self.ids] + marked

    def pytest_runtestloop(self, session):
        if self.items and not session.config.option.collectonly:
            self._start()                         # returns None: pytest's own loop runs the items

    def _start(self):
        self.dir = Path(tempfile.mkdtemp(prefix="fastfuse-interpreter-"))
        (self.dir / "items.txt").write_text("\n".join(i.nodeid for i in self.items) + "\n")
        cfg = self.config
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={cfg.rootpath}",
                f"--basetemp={self.dir / 'tmp'}"]
        if cfg.inipath:
            args += ["-c", str(cfg.inipath)]
        if cfg.option.maxfail:
            args.append(f"--maxfail={cfg.option.maxfail}")
        if getattr(cfg.option, "timeout", None):
            args.append(f"--timeout={cfg.option.timeout}")
        args += sorted({str(i.path) for i in self.items})
        env = dict(os.environ, TRITON_INTERPRET="1", **{ITEMS_ENV: str(self.dir / "items.txt"),
                                                        REPORTS_ENV: str(self.dir / "reports.jsonl")})
        with open(self.dir / "output.txt", "wb") as log:
            # niced: the main session's tests that time things (deadlines, step caps) come first
            self.child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          cwd=cfg.invocation_params.dir, start_new_session=True,
                                          preexec_fn=lambda: os.nice(CHILD_NICENESS))
        self.started = time.monotonic()

    def _stop(self):
        if self.child is not None and self.child.poll() is None:
            os.killpg(self.child.pid, signal.SIGKILL)   # its own session: the child and what it started
            self.child.wait()

    def _collect(self):
        """Wait for the child (within CHILD_TIMEOUT_S) and read its reports."""
        try:
            self.child.wait(timeout=max(1.0, CHILD_TIMEOUT_S - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self._stop()
            self.note = f"killed after {CHILD_TIMEOUT_S:.0f} s; "
        lines = (self.dir / "output.txt").read_text(errors="replace").strip().splitlines()
        self.note += f"exit status {self.child.returncode}: {lines[-1] if lines else 'no output'}"
        self.reports = {}
        path = self.dir / "reports.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
            rep = self.config.hook.pytest_report_from_serializable(config=self.config, data=json.loads(line))
            if isinstance(rep.longrepr, list):      # a skip's (path, line, reason): JSON made it a list
                rep.longrepr = tuple(rep.longrepr)
            self.reports.setdefault(rep.nodeid, []).append(rep)

    def _missing(self, item) -> pytest.TestReport:
        text = f"not reported by the TRITON_INTERPRET=1 session ({self.note}); "
        if self.first_missing:
            text += f"its output: see {self.first_missing}"
        else:
            self.first_missing = item.nodeid
            text += "its output ends:\n" + (self.dir / "output.txt").read_text(errors="replace")[-6000:]
        return pytest.TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, "failed", text, "call")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item):
        if item.nodeid not in self.ids or self.child is None:
            return None
        if self.reports is None:
            self._collect()
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = self.reports.get(item.nodeid) or [self._missing(item)]
        for rep in reports:
            item.ihook.pytest_runtest_logreport(report=rep)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def pytest_terminal_summary(self, terminalreporter):
        if self.child is not None and self.reports is not None:
            terminalreporter.write_line(f"{MARK}: {len(self.items)} tests sent to one TRITON_INTERPRET=1 pytest "
                                        f"session, {len(self.reports)} reported ({self.note})")

    def pytest_unconfigure(self):
        self._stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
