"""The agent as shipped to hosts: a deterministic zipapp plus the bootstrap that installs it.

The controller starts ``python3 -c BOOTSTRAP <root> <sha>`` on a host (through ssh, or as a local
subprocess). The bootstrap asks for the zipapp only when ``<root>/.shiplane/agent-<sha>/`` is
missing, so the agent crosses the wire once per version; the host unpacks and byte-compiles it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import threading
import zipfile
from pathlib import Path

PACKAGE = "shiplane_agent"
# What a host's Python may be called in the deploy file (``python``, ``host_python``): the
# interpreter that runs BOOTSTRAP, a program path or name, never an option or a shell word
INTERPRETER = re.compile(r"^[A-Za-z0-9_./~+][A-Za-z0-9_./~+-]*$")
# Any fixed date works; 1980-01-01 is the earliest a zip can record.
_EPOCH = (1980, 1, 1, 0, 0, 0)

_ZIP_MAIN = f"import runpy\nrunpy.run_module({PACKAGE!r}, run_name='__main__', alter_sys=True)\n"


_ZIPPING = threading.Lock()


def agent_zip() -> tuple[bytes, str]:
    """The agent zipapp's bytes and their sha256 (hex); identical bytes for identical sources.
    Made once per process: every host's session asks for it at once, from its own thread."""
    with _ZIPPING:
        return _agent_zip()


@functools.lru_cache(maxsize=1)
def _agent_zip() -> tuple[bytes, str]:
    source_dir = Path(__file__).resolve().parent / "agent"
    entries = [("__main__.py", _ZIP_MAIN.encode("utf-8"))]
    for path in sorted(source_dir.glob("*.py")):
        entries.append((f"{PACKAGE}/{path.name}", path.read_bytes()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, so external_attr means the same everywhere
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


# Kept compact (it travels on every ssh command line) and valid on any Python 3. The zipapp is
# unpacked into ``agent-<sha>/`` and byte-compiled by the host's own Python, once: run from a zip,
# every agent process (the session, exec-env before each gunicorn, the front proxy) compiled its
# modules again, ~0.1 s of CPU each. The directory appears by one rename, so it is complete.
#
# ``early`` (a third argument): started while the controller still validates the deploy file
# (transport/prewarm.py), the bootstrap creates nothing and runs nothing of the agent's until a
# ``go`` line comes (EOF: it exits); meanwhile it only imports the agent, if it is there.
BOOTSTRAP = r"""import hashlib,os,sys,runpy
r=os.path.abspath(os.path.expanduser(sys.argv[1]));s=sys.argv[2]
if len(s)!=64 or s.strip("0123456789abcdef"):sys.stderr.write("shiplane: bad agent sha\n");sys.exit(2)
d=os.path.join(r,".shiplane")
p=os.path.join(d,"agent-%s"%s)
if sys.argv[3:]==["early"]:
 if os.path.isdir(p):
  sys.path.insert(0,p)
  try:import shiplane_agent.server,shiplane_agent.services
  except Exception:pass
 if sys.stdin.buffer.readline()!=b"go\n":sys.exit(0)
if not os.path.isdir(d):os.makedirs(d)
if not os.path.isdir(p):
 import io,shutil,zipfile,compileall
 sys.stdout.write("NEED\n");sys.stdout.flush()
 i=sys.stdin.buffer;n=int(i.readline());c=[];g=0
 while g<n:
  b=i.read(min(n-g,1<<20))
  if not b:break
  c.append(b);g+=len(b)
 b=b"".join(c)
 if hashlib.sha256(b).hexdigest()!=s:sys.stderr.write("shiplane: agent upload corrupted (sha256 mismatch, %d of %d bytes)\n"%(len(b),n));sys.exit(3)
 t="%s.tmp-%d"%(p,os.getpid());z=zipfile.ZipFile(io.BytesIO(b))
 if any(m.startswith("/") or ".." in m.split("/") for m in z.namelist()):sys.stderr.write("shiplane: bad agent member\n");sys.exit(3)
 z.extractall(t);compileall.compile_dir(t,quiet=2)
 try:os.rename(t,p)
 except OSError:
  if not os.path.isdir(p):raise
  shutil.rmtree(t)
os.environ["SHIPLANE_AGENT_DIR"]=p;p in sys.path or sys.path.insert(0,p);sys.argv=[p,"serve",r]
runpy.run_module("shiplane_agent",run_name="__main__",alter_sys=True)
"""


def bootstrap_argv(python: str, root: str, sha: str, *, early: bool = False) -> list[str]:
    """The argv that starts an agent session for ``root`` (send the zip if it answers ``NEED``);
    ``early``: it waits for a ``go`` line first (see BOOTSTRAP)."""
    # -S: stdlib only, no site to load
    return [python, "-S", "-c", BOOTSTRAP, root, sha, *(["early"] if early else [])]
