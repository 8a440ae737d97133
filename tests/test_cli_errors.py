"""The ``fastlm`` command's errors (fastlm.cli, fastlm.engine.cli, fastlm.info, fastlm.bench.cli): one line
on stderr naming the argument and the problem, exit status 2, found before the model loads and before
anything reaches stdout; honest figures when nothing was timed; Ctrl-C at any time exits with status 130
and no traceback. Validation tests never load weights: ``load`` is replaced by a function that fails the
test, or the check runs in a fresh interpreter that reports which heavy modules it imported."""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fastlm
import fastlm.cli
from fastlm.engine import cli as gen_cli

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
ENTRY = "import sys; from fastlm.cli import main; sys.exit(main())"  # what the console script runs


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTLM_DEBUG", "FASTLM_BACKEND")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def default_sigint() -> None:
    """preexec_fn of the children that a test interrupts: a suite run as a background job (`pytest tests &`)
    ignores SIGINT, its children inherit that, and the CLI keeps an ignored SIGINT ignored (as a background
    job's command should)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_main(capsys, *argv):
    """fastlm.cli.main(argv) in this process -> (exit status, stdout, stderr)."""
    try:
        code = fastlm.cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse exits (errors, --help)
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err and "usage:" not in err
    return lines[0]


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if fastlm generate gets as far as loading a checkpoint."""
    def load(*args, **kwargs):
        pytest.fail("the model was loaded before the bad argument was reported")
    monkeypatch.setattr(gen_cli, "load", load)


# ---- 1. argparse errors: one line, status 2; --help unchanged ------------------------------------------
@pytest.mark.parametrize("argv, prog, fragment", [
    (["generate", "--max-new-tokens", "x"], "fastlm generate", "argument --max-new-tokens: expected an integer"),
    (["generate", "--dtype", "float8"], "fastlm generate", "argument --dtype: invalid choice: 'float8'"),
    (["generate", "--bogus"], "fastlm generate", "unrecognized arguments: --bogus"),
    (["generate", "--prompt"], "fastlm generate", "argument --prompt: expected one argument"),
    (["chat", "--max-cache-len", "1"], "fastlm chat", "argument --max-cache-len: must be >= 2, got 1"),
    (["chat", "--when-full", "never"], "fastlm chat", "argument --when-full: invalid choice: 'never'"),
    (["chat", "--prompt", "hi"], "fastlm chat", "unrecognized arguments: --prompt hi"),
    (["bench", "--compile-timeout", "soon"], "fastlm bench", "argument --compile-timeout: invalid float value"),
    (["bench", "--bogus"], "fastlm bench", "unrecognized arguments: --bogus"),
    (["info", "--bogus"], "fastlm info", "unrecognized arguments: --bogus"),
    (["nosuch"], "fastlm", "unknown command 'nosuch'"),
    (["--bogus"], "fastlm", "unknown command '--bogus'"),
])
def test_argument_errors_are_one_line(capsys, no_load, argv, prog, fragment):
    code, out, err = run_main(capsys, *argv)
    assert code == EXIT_USAGE and out == ""
    assert fragment in one_error_line(err, prog)


@pytest.mark.parametrize("command, option", [("generate", "--max-new-tokens"), ("chat", "--when-full"),
                                             ("bench", "--quick"), ("info", "--help")])
def test_help_still_prints_full_help(capsys, command, option):
    code, out, err = run_main(capsys, command, "--help")
    assert code == 0 and err == ""
    assert out.startswith(f"usage: fastlm {command}") and option in out


def test_top_level_help(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and all(name in out for name in fastlm.cli.COMMANDS)


# ---- 2. every value is checked, before the model (and torch) loads --------------------------------------
BAD_VALUES = [
    ("--temperature", "nan", "finite number >= 0"), ("--temperature", "inf", "finite number >= 0"),
    ("--temperature", "-0.5", "finite number >= 0"), ("--temperature", "hot", "expected a number"),
    ("--top-k", "0", "must be >= 1"), ("--top-k", "-3", "must be >= 1"), ("--top-k", "2.5", "expected an integer"),
    ("--top-p", "0", "in (0, 1]"), ("--top-p", "1.01", "in (0, 1]"), ("--top-p", "nan", "in (0, 1]"),
    ("--top-p", "-inf", "in (0, 1]"),
    ("--max-new-tokens", "-1", "must be >= 0"), ("--max-new-tokens", "1e3", "expected an integer"),
    ("--seed", "-1", f"in [0, {gen_cli.SEED_MAX}]"), ("--seed", str(2**32), f"in [0, {gen_cli.SEED_MAX}]"),
    ("--seed", "abc", "expected an integer"), ("--stop", "", "a stop string must not be empty"),
]


@pytest.mark.parametrize("flag, value, fragment", BAD_VALUES)
def test_bad_values_name_the_flag(capsys, no_load, flag, value, fragment):
    code, out, err = run_main(capsys, "generate", "--prompt", "hi", f"{flag}={value}")  # = : "-inf" is a value
    assert code == EXIT_USAGE and out == ""
    line = one_error_line(err, "fastlm generate")
    assert f"argument {flag}: " in line and fragment in line


def test_edge_values_are_accepted():
    args = gen_cli.build_parser().parse_args(["--temperature", "0", "--top-k", "1", "--top-p", "1",
                                              "--max-new-tokens", "0", "--seed", str(gen_cli.SEED_MAX)])
    assert (args.temperature, args.top_k, args.top_p, args.max_new_tokens) == (0.0, 1, 1.0, 0)
    assert args.seed == gen_cli.SEED_MAX


PROBE = r"""
import json, sys
from fastlm.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        codes.append(main(argv))
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


def probe(argvs: list[list[str]], **env) -> tuple[dict, list[str]]:
    """Run fastlm.cli.main on each argv in one fresh interpreter -> (report, stderr lines)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True,
                          env=child_env(**env), timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    return report, [line for line in proc.stderr.splitlines() if line.strip()]


def test_argument_errors_come_before_torch_is_imported(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    argvs = [["generate", "--prompt", "hi", f"{flag}={value}"] for flag, value, _ in BAD_VALUES]
    argvs += [["generate", "--prompt-file", str(latin1)], ["generate", "--prompt-file", str(tmp_path)],
              ["generate", "--prompt-file", str(tmp_path / "missing.txt")], ["generate"],
              ["generate", "--prompt", "hi", "--model", str(tmp_path / "nope")],
              ["generate", "--prompt", "hi", "--model", str(latin1)],
              ["generate", "--prompt", "hi", "--model", str(tmp_path)],
              ["generate", "--prompt", "hi", "--system", "be brief"],
              ["chat", "--temperature=nan"], ["chat", "--model", str(tmp_path / "nope")],
              ["info", "--bogus"], ["nosuch"]]
    report, lines = probe(argvs)
    assert report["codes"] == [EXIT_USAGE] * len(argvs)
    assert len(lines) == len(argvs) and all(": error: " in line for line in lines), lines
    assert not report["torch"] and not report["transformers"]


def test_device_and_backend_errors_come_before_transformers_is_imported():
    argvs = [["generate", "--prompt", "hi", "--device", "cpu", "--backend", "triton"]]
    report, lines = probe(argvs, TRITON_INTERPRET="0")
    assert report["codes"] == [EXIT_USAGE] and len(lines) == 1
    assert lines[0].startswith("fastlm generate: error: --backend triton: ") and "unavailable for cpu" in lines[0]
    assert not report["transformers"]


@pytest.fixture
def no_triton_interpreter(monkeypatch):
    """TRITON_INTERPRET unset for one test (conftest's interpreter mode is what lets Triton run on CPU).
    Triton reads it once, when it is imported: import the backend first, under the interpreter, or every
    later Triton test in this process would get compiled kernels, which refuse CPU tensors."""
    from fastlm.ops._registry import backend_status

    backend_status("triton", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET")


def test_backend_unavailable_here(capsys, no_load, no_triton_interpreter):
    code, out, err = run_main(capsys, "generate", "--prompt", "hi", "--device", "cpu", "--backend", "triton")
    assert code == EXIT_USAGE and out == ""
    assert "--backend triton: " in one_error_line(err, "fastlm generate")


@pytest.mark.parametrize("value, fragment", [("foo", "unknown backend 'foo'"), ("triton", "unavailable for cpu")])
def test_fastlm_backend_variable_is_named(capsys, no_load, no_triton_interpreter, monkeypatch, value, fragment):
    monkeypatch.setenv("FASTLM_BACKEND", value)
    code, out, err = run_main(capsys, "generate", "--prompt", "hi", "--device", "cpu")
    line = one_error_line(err, "fastlm generate")
    assert code == EXIT_USAGE and out == ""
    assert f"FASTLM_BACKEND={value}" in line and fragment in line


def test_cuda_without_a_gpu(capsys, no_load, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_main(capsys, "generate", "--prompt", "hi", "--device", "cuda")
    assert code == EXIT_USAGE and out == ""
    assert "--device cuda" in one_error_line(err, "fastlm generate")


# ---- 3. prompt files ---------------------------------------------------------------------------------
def test_prompt_file_errors_name_flag_and_file(capsys, no_load, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    for path, fragment in [(latin1, "is not UTF-8 text (byte 0xe9 at offset 3)"),
                           (tmp_path, "Is a directory"), (tmp_path / "missing.txt", "No such file")]:
        code, out, err = run_main(capsys, "generate", "--prompt-file", path)
        line = one_error_line(err, "fastlm generate")
        assert code == EXIT_USAGE and out == ""
        assert f"--prompt-file {path}" in line and fragment in line


# ---- 4. honest figures when nothing was timed -----------------------------------------------------------
def strict_json(line: str) -> dict:
    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")
    return json.loads(line, parse_constant=no_constants)


def expected_backend() -> str:
    from fastlm.ops._registry import resolve

    return resolve("auto", "cpu")


def test_zero_new_tokens_reports_the_real_backend_and_no_rates(capsys):
    code, out, err = run_main(capsys, "generate", "--prompt", "The list", "--max-new-tokens", 0, "--device", "cpu")
    assert code == 0, err
    assert out == "The list\n"
    summary = err.strip().splitlines()[-1]
    assert "nan" not in summary.lower()
    head, memory = summary.split(", peak memory: ")
    assert re.fullmatch(r"prompt tokens: \d+, new tokens: 0, load: [\d.]+ s, prefill: -, decode: -", head), summary
    assert re.fullmatch(rf"[\d.]+ MiB RSS \(backend {expected_backend()}, nothing generated\)", memory), summary
    code, out, err = run_main(capsys, "generate", "--prompt", "The list", "--max-new-tokens", 0, "--device", "cpu",
                              "--json")
    assert code == 0, err
    row = strict_json(out)
    assert row["new_tokens"] == 0 and row["token_ids"] == []
    assert row["prefill_ms"] is None and row["decode_tokens_per_s"] is None and row["mode"] is None
    assert row["prefill_tokens_per_s"] is None and row["load_s"] > 0 and row["peak_memory_bytes"] > 0
    assert row["backend"] == expected_backend()


def test_one_new_token_has_no_decode_rate(capsys):
    argv = ["generate", "--prompt", "The list", "--max-new-tokens", 1, "--device", "cpu"]
    code, out, err = run_main(capsys, *argv)
    assert code == 0, err
    summary = err.strip().splitlines()[-1]
    assert ", new tokens: 1, " in summary and "decode: -, peak memory: " in summary and "nan" not in summary.lower()
    assert f"(backend {expected_backend()}, " in summary
    code, out, err = run_main(capsys, *argv, "--json")
    row = strict_json(out)
    assert code == 0 and row["new_tokens"] == 1 and row["decode_tokens_per_s"] is None and row["prefill_ms"] > 0


def test_nothing_on_stdout_when_generation_fails_to_start(capsys, monkeypatch):
    def failing_stream(*args, **kwargs):
        raise RuntimeError("the engine refused")
        yield  # a generator, as fastlm.stream is: it fails on the first step

    monkeypatch.setattr(fastlm, "stream", failing_stream)
    code, out, err = run_main(capsys, "generate", "--prompt", "The list", "--device", "cpu")
    assert code == 1 and out == ""
    assert one_error_line(err, "fastlm generate") == "fastlm generate: error: the engine refused"


def test_warnings_are_one_line(capsys):
    # the demo checkpoint's context is 256 tokens: 300 new tokens fill its KV cache
    code, out, err = run_main(capsys, "generate", "--prompt", "The list", "--max-new-tokens", 300, "--ignore-eos",
                              "--device", "cpu")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("fastlm generate: warning: ") and "cache" in lines[0], err
    assert lines[1].startswith("prompt tokens: ")


# ---- 5. Ctrl-C ------------------------------------------------------------------------------------------
def _mapped(pid: int, name: str) -> bool:
    try:
        return name in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def assert_interrupted(proc: subprocess.Popen, stdout_before: bytes = b"") -> bytes:
    out, err = proc.communicate(timeout=120)
    err = err.decode(errors="replace")
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert [line for line in err.splitlines() if line.strip()] == ["fastlm generate: interrupted"], err
    return stdout_before + out


def test_ctrl_c_during_start_up_imports(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", ENTRY, "generate", "--prompt", "hi"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env(), cwd=tmp_path, preexec_fn=default_sigint)
    if Path(f"/proc/{proc.pid}/maps").exists():
        deadline = time.monotonic() + 120
        # wait until torch's import is under way (its shared library is mapped), then interrupt it
        while not _mapped(proc.pid, "libtorch") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        time.sleep(0.5)
    assert proc.poll() is None, "the command ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    assert assert_interrupted(proc) == b""


def test_ctrl_c_swallowed_inside_the_torch_import_is_raised_again(tmp_path):
    """torch's C++ start-up takes a KeyboardInterrupt in its numpy import for "numpy is absent" (the test above
    flaked so under load: the command ran to the end). A stand-in torch that swallows one shows the CLI's
    import raises it again once the import returns, and passes a clean import through."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "import os, signal, time\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    pass  # as torch/csrc/utils/tensor_numpy.cpp does with any error in `import numpy`\n")
    code = ("import signal, sys\nsys.path.insert(0, sys.argv[1])\nimport fastlm.cli as cli\n"
            "signal.signal(signal.SIGINT, cli._first_interrupt)\n"
            "try:\n    cli.import_torch()\nexcept KeyboardInterrupt:\n    print('raised again')\n"
            "print(cli.import_torch().__file__)\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60,
                         env=child_env(), preexec_fn=default_sigint)
    assert res.returncode == 0 and res.stdout.splitlines() == [
        "raised again", str(tmp_path / "torch" / "__init__.py")], res.stdout + res.stderr


@pytest.fixture(scope="module")
def long_context_demo(tmp_path_factory) -> Path:
    """The demo checkpoint with a 16k-token context (RoPE tables only; the weights are unchanged):
    generation runs for seconds, long enough to be interrupted in the middle."""
    path = tmp_path_factory.mktemp("demo16k")
    for f in gen_cli.DEMO_DIR.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, path / f.name)
    config = json.loads((gen_cli.DEMO_DIR / "config.json").read_text())
    config["max_position_embeddings"] = 16384
    (path / "config.json").write_text(json.dumps(config))
    return path


def read_some(proc: subprocess.Popen, n: int, timeout: float) -> bytes:
    """Read stdout until it has at least n bytes (the child flushes after every token)."""
    got, deadline = b"", time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, (got, proc.poll())
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, "stdout closed before any text came"
            got += chunk
    return got


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_generation(long_context_demo, tmp_path, presses):
    prompt = "The list"
    proc = subprocess.Popen([sys.executable, "-m", "fastlm", "generate", "--model", str(long_context_demo),
                             "--prompt", prompt, "--max-new-tokens", "16000", "--ignore-eos", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), cwd=tmp_path,
                            preexec_fn=default_sigint)
    streamed = read_some(proc, len(prompt) + 1, timeout=120)  # the prompt's echo and generated text
    assert streamed.startswith(prompt.encode())
    for _ in range(presses):  # a second Ctrl-C lands while the command winds down
        proc.send_signal(signal.SIGINT)
    assert assert_interrupted(proc, streamed).startswith(prompt.encode())


# ---- 6. FASTLM_DEBUG and the caller's state -------------------------------------------------------------
def _raising(exc):
    def run(args):
        raise exc
    return run


def test_debug_re_raises(capsys, monkeypatch):
    monkeypatch.setattr(gen_cli, "run", _raising(RuntimeError("deep inside")))
    code, out, err = run_main(capsys, "generate", "--prompt", "hi")
    assert code == 1 and one_error_line(err, "fastlm generate") == "fastlm generate: error: deep inside"
    monkeypatch.setenv("FASTLM_DEBUG", "1")
    with pytest.raises(RuntimeError, match="deep inside"):
        fastlm.cli.main(["generate", "--prompt", "hi"])
    monkeypatch.setattr(gen_cli, "run", _raising(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        fastlm.cli.main(["generate", "--prompt", "hi"])


def test_interrupt_in_process_and_sigint_handler_restored(capsys, monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(gen_cli, "run", _raising(KeyboardInterrupt()))
    code, out, err = run_main(capsys, "generate", "--prompt", "hi")
    assert code == EXIT_INTERRUPTED and out == "" and err == "fastlm generate: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is before
    assert run_main(capsys, "generate", "--prompt", "hi", "--top-k", "0")[0] == EXIT_USAGE
    assert signal.getsignal(signal.SIGINT) is before


def test_closed_stdout_ends_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", ENTRY, "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env(), cwd=tmp_path)
    proc.stdout.close()  # the reader goes away before the command prints (it is still importing torch)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == fastlm.cli.EXIT_BROKEN_PIPE and b"Traceback" not in err and err == b"", err
