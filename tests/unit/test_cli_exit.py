"""`exit_process`: the CLI ends without the interpreter's teardown, but nothing a normal exit does for the user is lost."""
import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_exit_code_atexit_handlers_and_unflushed_output_survive(tmp_path):
    log = tmp_path / "log.txt"
    out = _run(f"""
        import atexit, logging, sys
        from megatron_rl.process_exit import exit_process
        logging.basicConfig(filename={str(log)!r}, level=logging.INFO)
        atexit.register(lambda: print("atexit ran", end=""))
        logging.getLogger("t").info("logged")
        print("partial line", end="")  # no newline: still in the buffer of a pipe
        sys.stderr.write("err without newline")
        exit_process(3)
    """)
    assert out.returncode == 3, out.stderr
    assert out.stdout == "partial lineatexit ran"
    assert out.stderr == "err without newline"
    assert "logged" in log.read_text()  # logging.shutdown (an atexit handler) flushed the file handler


def test_a_running_non_daemon_thread_gets_a_normal_exit():
    out = _run("""
        import threading, time
        from megatron_rl.process_exit import exit_process
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished"))).start()
        exit_process(4)
    """)
    assert out.returncode == 4 and "thread finished" in out.stdout, out.stderr
