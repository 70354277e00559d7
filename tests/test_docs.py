"""Every "DESIGN.md §N" cited in the code or the README names a section of docs/DESIGN.md."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_design_sections_cited_exist():
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", design, re.M))
    assert {"1", "2", "3", "4"} <= sections
    cited = {}
    files = [ROOT / "README.md", *ROOT.glob("fastfuse/**/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("csrc/*")]
    for f in files:
        for n in re.findall(r"DESIGN\.md §(\d+)", f.read_text(errors="replace")):
            cited.setdefault(n, []).append(f.name)
    assert cited, "no citations found: the pattern is wrong"
    missing = {n: fs for n, fs in cited.items() if n not in sections}
    assert not missing, f"cited sections absent from docs/DESIGN.md: {missing}"


def readme_commands(doc: str = "README.md") -> list[str]:
    """A document's shell commands: bash blocks, continuation lines joined, split at && ; and |."""
    text = (ROOT / doc).read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
            cmds += [c.strip() for c in re.split(r"&&|;|\|", line) if c.strip()]
    # and inline ones: `fastfuse demo --size tiny`, `torchrun ... -m fastfuse extract ...`
    return cmds + re.findall(r"`((?:fastfuse|torchrun|python examples/fuse_hf\.py) [^`]+)`", text)


def test_ci_runs_exactly_the_readme_test_command():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "pytest tests" in b]
    (command,) = [line for line in block.splitlines() if not line.startswith("#")]
    assert ci[-1] == command
    assert command.index("pip install -r requirements.txt -e .") < command.index("requirements-dev.txt")


def test_readme_flags_exist():
    """Every flag of a `fastfuse CMD` or `examples/fuse_hf.py STAGE` command in the README's (and
    docs/DESIGN.md's) shell blocks is one the parser knows (a renamed flag fails here, not in a user's shell)."""
    import argparse
    import importlib.util

    from fastfuse.cli import build_parser

    spec = importlib.util.spec_from_file_location("fuse_hf", ROOT / "examples" / "fuse_hf.py")
    fuse_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuse_hf)

    def flags_of(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}

    known = {"fastfuse": flags_of(build_parser()), "examples/fuse_hf.py": flags_of(fuse_hf.build_parser())}
    checked = 0
    for cmd in readme_commands() + readme_commands("docs/DESIGN.md"):
        words = cmd.split()
        for prog, commands in known.items():
            starts = [i for i, w in enumerate(words) if w == prog and i + 1 < len(words)]
            if prog == "fastfuse":
                starts = [i for i in starts if i == 0 or words[i - 1] == "-m"]
            for i in starts:
                name = words[i + 1]
                assert name in commands, f"README: {cmd!r}: no command {name!r}"
                for w in words[i + 2:]:
                    if w.startswith("--"):
                        assert w.split("=")[0] in commands[name], f"README: {cmd!r}: {name} has no flag {w}"
                checked += 1
    assert checked >= 10, checked
