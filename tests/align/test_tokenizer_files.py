"""The offline real-tokenizer fixture reproduces llama.cpp's expected tokenisations."""
import pytest

from fastfuse.tokenizer_files import SDIST_SHA256, TOKENIZERS, vocab_test_cases

from conftest import REQUIRED_FAMILIES


def test_cache_is_complete_and_checked(vocab_dir):
    assert (vocab_dir / ".complete").read_text() == SDIST_SHA256
    for name in TOKENIZERS:
        assert (vocab_dir / f"ggml-vocab-{name}.gguf").stat().st_size > 100_000


@pytest.mark.parametrize("name", REQUIRED_FAMILIES + ["phi-3"])
def test_tokenizer_matches_llama_cpp_vectors(real_tokenizer, name):
    tok = real_tokenizer(name)
    cases = vocab_test_cases(name)
    assert len(cases) >= 40
    for case in cases:
        assert tok(case.text, add_special_tokens=False).input_ids == case.ids, repr(case.text)


@pytest.mark.parametrize("name,size", [("llama-spm", 32000), ("llama-bpe", 128256), ("gpt-2", 50257), ("mpt", 50432)])
def test_vocab_sizes(real_tokenizer, name, size):
    assert real_tokenizer(name).backend_tokenizer.get_vocab_size(with_added_tokens=False) >= size - 300
    assert len(real_tokenizer(name)) >= size


def test_unknown_name_is_a_clear_error():
    from fastfuse.tokenizer_files import load_tokenizer

    with pytest.raises(ValueError, match="name: unknown tokenizer"):
        load_tokenizer("no-such-model")


def test_first_download_says_what_it_does_and_shows_progress(tmp_path, monkeypatch, capsys):
    """An empty cache: one line says what is downloaded, from where and that later runs are offline,
    before the download starts; a progress bar follows. A local index (127.0.0.1) serves a file of the
    right name but the wrong content, which the sha256 check then refuses."""
    import functools
    import http.server
    import threading

    import pytest

    from fastfuse import tokenizer_files as vocabfiles

    root = tmp_path / "index"
    (root / vocabfiles.SDIST_NAME).mkdir(parents=True)
    (root / vocabfiles.SDIST_NAME / "index.html").write_text(f'<a href="./{vocabfiles.SDIST_FILE}#sha256=0">x</a>')
    (root / vocabfiles.SDIST_NAME / vocabfiles.SDIST_FILE).write_bytes(b"not the sdist" * 100000)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root)))
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("FASTFUSE_CACHE", str(tmp_path / "cache"))
        # only this index, never PyPI (which _download_sdist would try next)
        monkeypatch.setattr(vocabfiles, "_index_urls", lambda: [f"http://127.0.0.1:{server.server_port}/"])
        with pytest.raises(RuntimeError, match="sha256"):
            vocabfiles.ensure_vocab_files()
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("fastfuse: first use of the real tokenizers: downloading their vocabulary files once")
    assert vocabfiles.SDIST_FILE in first and "later runs are offline" in first
    assert "1.30M/1.30M" in err          # the progress bar reached the file's size
