"""rlora/console.py: what reaches the console and what goes to the run's log file (in an unbuffered child
process, so that stdout and stderr are real file descriptors, as in a user's terminal)."""
import subprocess
import sys
import textwrap


def run(code: str, tmp_path) -> subprocess.CompletedProcess:
    prog = "import os, sys\nfrom pathlib import Path\nfrom rlora import console\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-u", "-c", prog], capture_output=True, text=True, cwd=tmp_path, timeout=120)


def test_run_log_sends_c_level_and_python_output_to_the_file_and_say_to_the_console(tmp_path):
    proc = run("""
        with console.run_log(Path("logs/run.log")):
            print("python print")
            os.write(2, b"c-level stderr\\n")
            console.say("[rlora] progress")
            assert console.active_log() == Path("logs/run.log")
        assert console.active_log() is None
        print("after")
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[rlora] progress\nafter\n" and proc.stderr == ""
    assert (tmp_path / "logs" / "run.log").read_text().splitlines() == ["python print", "c-level stderr",
                                                                        "[rlora] progress"]


def test_a_nested_run_log_keeps_the_enclosing_file(tmp_path):
    """What `rlora compare` relies on when cells run at once: one shared log, the cells' own are no-ops."""
    proc = run("""
        with console.run_log(Path("compare.log")):
            with console.run_log(Path("cell/run.log")) as p:
                assert p == Path("cell/run.log") and console.active_log() == Path("compare.log")
                print("library line")
            print("after the cell")
    """, tmp_path)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    assert (tmp_path / "compare.log").read_text().splitlines() == ["library line", "after the cell"]
    assert not (tmp_path / "cell" / "run.log").exists()


def test_verbose_leaves_the_console_alone(tmp_path):
    proc = run("""
        with console.run_log(Path("run.log"), verbose=True):
            print("shown")
            assert console.active_log() is None
    """, tmp_path)
    assert proc.returncode == 0 and proc.stdout == "shown\n" and not (tmp_path / "run.log").exists()


def test_tagged_lines_name_their_run_in_threads_that_copy_the_context(tmp_path):
    """`rlora compare` trains cells at once in threads; the progress relay is a thread of its own, started
    with a copy of the cell's context, so its lines keep the tag; other threads' lines do not get it."""
    proc = run("""
        import contextvars, threading
        console.say("[rlora] before")
        with console.tagged("lora/proportional/seed 42"):
            console.say("[rlora] run header")
            t = threading.Thread(target=contextvars.copy_context().run, args=(console.say, "[rlora] step 5/10"))
            t.start(); t.join()
            u = threading.Thread(target=console.say, args=("[rlora] another run",))
            u.start(); u.join()
        console.say("[rlora] after")
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[rlora] before", "[rlora] lora/proportional/seed 42 | run header",
                                        "[rlora] lora/proportional/seed 42 | step 5/10", "[rlora] another run",
                                        "[rlora] after"]
