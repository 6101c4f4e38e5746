"""setup.sh, run as a user would twice (`bash setup.sh`, then `bash setup.sh --dev`): the second
run must not rebuild the extension when nothing it is built from changed (pip is a stand-in that
logs its calls; the build is a file the stand-in writes)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _copy_with_stand_in_pip(tmp_path, pip_script: str):
    """A copy of what setup.sh reads, and a PATH whose pip is `pip_script` -> (repo, env)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("setup.sh", "setup.py", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "csrc", repo / "csrc")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text(pip_script)
    (bin_dir / "pip").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LLAMA2_NO_CUDA": "1"}
    env.pop("LLAMA2_ALLOW_NO_EXTENSION", None)
    return repo, env


def test_setup_rebuilds_the_extension_only_when_its_inputs_change(tmp_path):
    log = tmp_path / "pip.log"
    # the stand-in pip: logs its arguments; `install -e .` "builds" an importable llama2_C (and
    # the llama2_kernels that setup.sh's last check imports, saying the extension loaded)
    repo, env = _copy_with_stand_in_pip(tmp_path, f"""#!/usr/bin/env bash
echo "$*" >> {log}
case " $* " in *" -e . "*) echo "AVAILABLE = True" > llama2_C.py
  printf 'AVAILABLE = True\\nIMPORT_ERROR = None\\ndef has_cuda():\\n    return False\\n' > llama2_kernels.py ;; esac
""")

    def setup(*args):
        r = subprocess.run(["bash", str(repo / "setup.sh"), *args], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def builds():
        return sum(" -e ." in f" {line} " for line in log.read_text().splitlines())

    setup()
    assert builds() == 1
    out = setup("--dev")
    assert builds() == 1, "the unchanged extension was built again"
    assert "not rebuilt" in out
    assert "-r requirements-dev.txt" in log.read_text()  # --dev still installs what it adds
    # a changed kernel source, or another build setting, is built again
    with open(repo / "csrc" / "ops.cpp", "a") as f:
        f.write("\n// changed\n")
    setup()
    assert builds() == 2
    env["LLAMA2_PORTABLE"] = "1"
    setup()
    assert builds() == 3
    # and a build that is gone (here: the module removed) is built again
    (repo / "llama2_C.py").unlink()
    setup()
    assert builds() == 4


def test_setup_fails_when_the_extension_does_not_build_unless_allowed(tmp_path):
    """A failed build ends setup.sh with exit 1 and a message (CI must not go on to skip the
    kernel tests); LLAMA2_ALLOW_NO_EXTENSION=1 goes on without the extension."""
    # the stand-in pip: every install works except the build of the extension
    repo, env = _copy_with_stand_in_pip(
        tmp_path, '#!/usr/bin/env bash\ncase " $* " in *" -e . "*) exit 1 ;; esac\n')
    r = subprocess.run(["bash", str(repo / "setup.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1
    assert "building the llama2_C extension failed" in r.stderr
    assert "LLAMA2_ALLOW_NO_EXTENSION=1" in r.stderr
    r = subprocess.run(["bash", str(repo / "setup.sh")], env={**env, "LLAMA2_ALLOW_NO_EXTENSION": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "the PyTorch reference path will be used" in r.stdout
