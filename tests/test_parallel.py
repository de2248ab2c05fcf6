"""Tensor-parallel processes end cleanly: a rank killed mid-run or failing to start is one clear error
in bounded time, and no worker outlives the run, even when rank 0 itself is killed."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import assert_a_killed_rank_ends_the_run, build_hf, tp_workers
from rosetool.errors import RosetoolError
from rosetool.runtime import LLM


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_hf("llama", tmp_path_factory.mktemp("tp-llama") / "hf")


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)   # a zombie has exited
    except FileNotFoundError:
        return True


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return gone(pid)


def test_killed_worker_ends_the_run_with_one_line(model):
    assert_a_killed_rank_ends_the_run(LLM(model, device="cpu", dtype="float32", tensor_parallel_size=2))


def test_worker_failing_to_start_is_named(model, tmp_path, monkeypatch):
    # Spawned workers run Python afresh, so a sitecustomize on their path makes rank 1 die at start-up.
    (tmp_path / "sitecustomize.py").write_text("import os\nos._exit(7)\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    start = time.monotonic()
    with pytest.raises(RosetoolError, match=r"^tensor-parallel rank 1 failed while starting \(exit code 7\)$"):
        LLM(model, device="cpu", tensor_parallel_size=2)
    assert time.monotonic() - start < 30
    assert not tp_workers()


def test_killed_rank0_leaves_no_orphan(model):
    script = textwrap.dedent(f"""
        from rosetool.runtime import LLM
        if __name__ == "__main__":
            llm = LLM({str(model)!r}, device="cpu", tensor_parallel_size=2)
            print(llm.runner.group.workers[0].pid, flush=True)
            llm.generate([[3, 4, 5]])
            print("ready", flush=True)
            import time
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_gone(worker, 10), f"worker {worker} outlived its rank 0"
    finally:
        proc.kill()
        proc.wait()


def test_hung_worker_times_out(model):
    # A stopped (not dead) rank keeps its sockets open: only the collective timeout can end the wait.
    script = textwrap.dedent(f"""
        import os, signal, time
        from rosetool.errors import RosetoolError
        from rosetool.runtime import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM({str(model)!r}, device="cpu", tensor_parallel_size=2)
            (worker,) = llm.runner.group.workers
            llm.add_request([3, 4, 5], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
            llm.step()
            os.kill(worker.pid, signal.SIGSTOP)
            start = time.monotonic()
            try:
                while llm.has_unfinished():
                    llm.step()
            except RosetoolError as err:
                print(round(time.monotonic() - start), worker.pid, err)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ROSETOOL_TP_TIMEOUT": "3"})
    seconds, pid, message = run.stdout.strip().split(" ", 2)
    assert message.startswith("tensor-parallel step failed on rank 0: ") and "ROSETOOL_TP_TIMEOUT=3 s" in message
    assert 3 <= int(seconds) < 30   # 3 s timeout + 1 s grace + terminate; slack for a loaded 2-core CI
    assert gone(int(pid))
