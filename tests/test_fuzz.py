"""Bad input is normal input: a corpus of hostile cases (tests/fuzz_corpus.py), generated
arguments and damaged protos (hypothesis), and signals mid-run. Every run must keep the
promise: exit 0/2/3/128+N (never 1), one line on error, no traceback, nothing written on
error, the input never changed, a written model valid. Small models: well under a minute.

``ONNXPRUNE_FUZZ_SUMMARY=counts.json pytest tests/test_fuzz.py`` writes the outcome counts;
``ONNXPRUNE_FUZZ_EXAMPLES=500`` draws more generated cases than CI's 40 per test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import fuzz_corpus
import nets
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxprune import writer
from onnxprune.cli import main

ROOT = Path(__file__).resolve().parent.parent
#: Examples per hypothesis test (CI: 40 each, well under a minute, the same every run; raise it
#: and set HYPOTHESIS_PROFILE=hunt for new draws).
EXAMPLES = int(os.environ.get("ONNXPRUNE_FUZZ_EXAMPLES", "40"))
OUTCOMES: Counter = Counter()
BREAKS: list = []


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    counts = {**dict(OUTCOMES), "promise breaks": len(BREAKS)}
    print("\nfuzz outcomes:", counts)
    if os.environ.get("ONNXPRUNE_FUZZ_SUMMARY"):
        Path(os.environ["ONNXPRUNE_FUZZ_SUMMARY"]).write_text(json.dumps(counts, indent=1))


def _record(name, outcome, breaks):
    OUTCOMES[outcome] += 1
    BREAKS.extend((name, b) for b in breaks)


@pytest.mark.parametrize("case", list(fuzz_corpus.CASES))
def test_corpus_case_keeps_the_promise(tmp_path, case):
    outcome, breaks, stderr = fuzz_corpus.run_case(case, tmp_path)
    if case in fuzz_corpus.VALID and outcome == "user error":
        breaks = [*breaks, f"a valid model was refused: {stderr.strip()}"]
    _record(case, outcome, breaks)
    assert not breaks, breaks


def test_valid_oddities_are_normalised_not_refused(tmp_path):
    """IR 3 stays IR 3 (initializers listed as inputs), functions are inlined, sparse
    initializers become dense, unsorted nodes come out sorted."""
    for case in ("IR 3, initializers listed as inputs", "model-local function", "sparse initializer", "unsorted nodes"):
        folder = tmp_path / case.split(",")[0].replace(" ", "_")
        argv = [str(a) for a in fuzz_corpus.CASES[case](folder.mkdir() or folder)]
        assert main(argv) == 0, case
        out = onnx.load(argv[1])
        onnx.checker.check_model(out, full_check=True)
        if case.startswith("IR 3"):
            assert out.ir_version == 3
            assert {t.name for t in out.graph.initializer} <= {v.name for v in out.graph.input}
        assert not out.functions and not out.graph.sparse_initializer


_MODEL_BYTES = nets.mlp().SerializeToString()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(_MODEL_BYTES) - 1), st.integers(0, 255),
                          st.sampled_from(["set", "cut", "insert"])), min_size=1, max_size=4))
def test_damaged_protos_keep_the_promise(tmp_path_factory, edits):
    """Byte-level damage to a valid model: whatever still parses is checked, never a bug."""
    data = bytearray(_MODEL_BYTES)
    for where, byte, how in edits:
        where = min(where, len(data) - 1)
        if how == "set":
            data[where] = byte
        elif how == "cut":
            del data[where:]
        else:
            data.insert(where, byte)
        if not data:
            data = bytearray(b"\0")
    tmp = tmp_path_factory.mktemp("proto")
    (tmp / "in.onnx").write_bytes(bytes(data))
    outcome, breaks, _ = fuzz_corpus.run_argv([str(tmp / "in.onnx"), str(tmp / "out.onnx"), *fuzz_corpus.RATIO], tmp)
    _record("damaged proto", outcome, breaks)
    assert not breaks, (edits, breaks)


_OPTIONS = st.sampled_from([
    ["--ratio", "0.3"], ["--ratio", "0"], ["--ratio", "-0.5"], ["--ratio", "x"], ["--method", "random"],
    ["--method", "paoding"], ["--method", "nope"], ["--seed", "7"], ["--seed", "-3"], ["--seed", "1e3"],
    ["--round-to", "8"], ["--round-to", "-1"], ["--check", "1"], ["--check", "0"], ["--min-cosine", "0.5"],
    ["--min-cosine", "2"], ["--min-cosine", "0.99999"], ["--keep-failed"], ["--dry-run"], ["--no-compensation"],
    ["--input-shape", "x:2,64"], ["--input-shape", "x:2,65"], ["--input-shape", "y:1,64"], ["--input-shape", "x:"],
    ["--input-range", "-1,1"], ["--input-range", "1,1"], ["--exclude", "*Gemm*"], ["--budget", "macs"],
    ["--reconstruction", "pair"], ["--reconstruction", "lol"], ["--step", "0.2"], ["--step", "2"], ["--force"],
    ["--report", "r.json"], ["--save-plan", "p.json"], ["--report", "in.onnx"], ["--save-plan", "out.onnx"],
    ["--report", "missing/r.json"], ["--plan", "in.onnx"], ["--latency"], ["-v"], ["--version"], ["--help"], ["--"],
])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_OPTIONS, max_size=5), st.sampled_from(["out.onnx", "in.onnx", ".", "no/out.onnx", "o.onnx"]))
def test_generated_arguments_keep_the_promise(tmp_path_factory, options, out):
    tmp = tmp_path_factory.mktemp("args")
    fuzz_corpus.save(nets.mlp(), tmp / "in.onnx")
    argv = ["in.onnx", out, "--ratio", "0.4", "--check", "2"] + [a for o in options for a in o]
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        outcome, breaks, _ = _run_tolerating_exit(argv, tmp)
    finally:
        os.chdir(cwd)
    _record("generated arguments", outcome, breaks)
    assert not breaks, (argv, breaks)


def _run_tolerating_exit(argv, tmp):
    """--help and --version end in SystemExit(0) with text on stdout, which is no error."""
    try:
        return fuzz_corpus.run_argv(argv, tmp)
    except SystemExit as exc:
        ok = exc.code == 0 and not list(tmp.rglob(".onnxprune-*"))
        return ("help", [], "") if ok else ("promise break", [f"SystemExit({exc.code})"], "")


def test_sigterm_while_writing_removes_every_temporary(tmp_path, monkeypatch, capsys):
    """SIGTERM arrives as the model file is being written: exit 143, no output, no temporary."""
    src = tmp_path / "in.onnx"
    onnx.save(nets.mlp(), str(src), save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    real = writer.Transaction.temporary
    calls = []

    def temporary(self, target):
        path = real(self, target)
        calls.append(path)
        if len(calls) == 2:  # the .data temporary is written, the model's is about to be
            path.write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises here
        return path
    monkeypatch.setattr(writer.Transaction, "temporary", temporary)
    before = fuzz_corpus._snapshot(tmp_path)
    code = main([str(src), str(tmp_path / "out.onnx"), *fuzz_corpus.RATIO])
    err = capsys.readouterr().err
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    OUTCOMES["interrupted"] += 1
    assert code == 143 and "interrupted; nothing written" in err and len(err.strip().splitlines()) == 1
    assert fuzz_corpus._snapshot(tmp_path) == before
    assert not list(tmp_path.glob(".onnxprune-*"))


def test_a_signal_while_the_handlers_are_installed_is_an_interruption(tmp_path, monkeypatch, capsys):
    """SIGTERM lands between installing the SIGTERM handler and the SIGHUP one (CI met it at
    0.05 s after start): exit 143 and one line, not a traceback and exit 1."""
    from onnxprune import cli

    def install_then_signal():
        writer._on_signal(signal.SIGTERM, None)

    monkeypatch.setattr(writer, "_RECEIVED", [])
    monkeypatch.setattr(writer, "_RELEASED", [])  # as handle_signals leaves it
    monkeypatch.setattr(cli, "handle_signals", install_then_signal)
    src = fuzz_corpus.save(nets.mlp(), tmp_path / "in.onnx")
    assert main([str(src), str(tmp_path / "out.onnx"), *fuzz_corpus.RATIO]) == 143
    err = capsys.readouterr().err
    assert err.strip() == "onnxprune: interrupted; nothing written"
    assert not (tmp_path / "out.onnx").exists()


def test_a_signal_after_the_run_has_returned_ends_the_process_the_default_way():
    """Once main() has its exit code nothing would catch the handler's exception: SIGTERM then
    terminates the process (-15), it does not print a traceback and exit 1."""
    code = ("import os, signal, sys, time\n"
            "from onnxprune.cli import main\n"
            "assert main(['no-such-model.onnx', 'out.onnx']) == 2\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(5)\n"
            "sys.exit(7)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM and "Traceback" not in proc.stderr


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_runs_temporaries_are_removed_by_the_next_run(tmp_path, capsys):
    src = fuzz_corpus.save(nets.mlp(), tmp_path / "in.onnx")
    stale = tmp_path / f".onnxprune-{_dead_pid()}-0badcafe.tmp"
    stale.write_bytes(b"half a model")
    legacy = tmp_path / ".onnxprune-abc123xy"  # the folder the writer before this one made
    legacy.mkdir()
    (legacy / "out.onnx").write_bytes(b"half")
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    mine = tmp_path / f".onnxprune-{os.getpid()}-00000000.tmp"  # a live process's: kept
    mine.write_bytes(b"in progress")
    assert main([str(src), str(tmp_path / "out.onnx"), *fuzz_corpus.RATIO]) == 0
    assert not stale.exists() and not legacy.exists() and mine.exists()
    mine.unlink()


def test_a_signal_that_comes_back_as_another_exception_is_still_an_interruption(tmp_path, monkeypatch, capsys):
    """SIGTERM while a C extension initialises (onnxruntime imported mid-run) surfaces as that
    module's ImportError, not as the handler's exception: still exit 143, nothing written, no
    "internal error" (the fresh-clone suite met it once, at 0.8 s)."""
    from onnxprune import cli, writer

    monkeypatch.setattr(writer, "_RECEIVED", [])

    def import_interrupted(argv):
        try:
            writer._on_signal(signal.SIGTERM, None)
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None

    monkeypatch.setattr(cli, "run_prune", import_interrupted)
    src = fuzz_corpus.save(nets.mlp(), tmp_path / "in.onnx")
    assert main([str(src), str(tmp_path / "out.onnx"), *fuzz_corpus.RATIO]) == 143
    err = capsys.readouterr().err
    assert "interrupted; nothing written" in err and "internal error" not in err
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("sig,delay", [(signal.SIGTERM, 0.05), (signal.SIGTERM, 0.8), (signal.SIGTERM, 1.6),
                                       (signal.SIGKILL, 1.2)])
def test_signal_at_a_random_moment_leaves_nothing_half_written(tmp_path, sig, delay):
    """A real process killed mid-run: after SIGTERM nothing is left but the input (or the
    complete output); after SIGKILL the next run clears what it left."""
    src = tmp_path / "in.onnx"
    onnx.save(nets.resnet(), str(src), save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "onnxprune.cli", str(src), str(tmp_path / "out.onnx"), *fuzz_corpus.RATIO]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    out = tmp_path / "out.onnx"
    if sig == signal.SIGTERM:
        # -15: the signal came before onnxprune's handler was installed (interpreter start-up)
        OUTCOMES["interrupted" if proc.returncode in (143, -15) else fuzz_corpus.OUTCOMES.get(proc.returncode, "?")] += 1
        assert proc.returncode in (0, 143, -15), err
        assert "Traceback" not in err
        assert not list(tmp_path.glob(".onnxprune-*"))
        if proc.returncode != 0:
            assert not out.exists()
        print(f"SIGTERM after {delay} s: exit {proc.returncode}")
    else:
        assert main([str(src), str(tmp_path / "again.onnx"), *fuzz_corpus.RATIO]) == 0
        assert not list(tmp_path.glob(".onnxprune-*"))
    if out.exists():
        onnx.checker.check_model(str(out))


@pytest.mark.parametrize("method", ["magnitude", "random", "paoding", "srdfp"])
def test_same_seed_same_bytes(tmp_path, method, capsys):
    src = fuzz_corpus.save(nets.mlp(), tmp_path / "in.onnx")
    outs = []
    for k in range(2):
        out = tmp_path / f"out{k}.onnx"
        assert main([str(src), str(out), "--ratio", "0.3", "--method", method, "--seed", "5", "--check", "1"]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_help_and_usage_errors_do_not_load_the_pipeline():
    """--help and argument errors import argparse-level modules only (issue #14)."""
    code = ("import sys; from onnxprune.cli import main; rc = main(['x.onnx', 'y.onnx', '--ratio', '5']); "
            "heavy = [m for m in ('onnx', 'onnxruntime', 'onnx_graphsurgeon', 'rich', 'numpy', 'onnxprune.pipeline') "
            "if m in sys.modules]; print(rc, heavy)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.strip() == "2 []", result.stdout + result.stderr


def test_method_choices_match_the_registry():
    from onnxprune.passes.registry import METHODS

    from onnxprune.cli import METHODS as listed

    assert {k: v for k, v in listed.items() if k != "auto"} == {name: m.description for name, m in METHODS.items()}
    assert "auto" in listed  # the default, which picks one of them per model
