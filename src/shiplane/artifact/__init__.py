"""Build the content-addressed artifact (SPEC §5) and run the test gate.

``build(spec)`` turns a checkout into one immutable artifact: the app (a wheel, a source tree,
or nothing), a wheelhouse of its locked dependencies for the hosts' target, the supervisor tool
wheel and the config templates, every file stored by sha256 in ``.shiplane/build/blobs`` and
listed in a manifest whose sha256 is the artifact's digest (docs/DESIGN.md, "Artifact").
"""

from ._build import (
    BuildResult,
    BuildSpec,
    CompiledApp,
    build,
    clean,
    compile_app,
    load_manifest,
    pack,
)
from ._cache import cache_root, remove_cache
from ._gate import check_entry, gate_env, run_gate
from ._gitref import RefTree, check_ref, export_ref, resolve_ref
from ._hostfit import host_misfit, platform_fits
from ._index import describe_packages
from ._interpreters import (
    Interpreter,
    controller_interpreter,
    target_fits,
    target_index,
    target_of,
)
from ._locks import check_warnings, describe_lock
from ._manifest import FileEntry, Manifest, canonical_json, dependency_digest
from ._source import GitInfo, detect_source, git_info
from ._store import BlobStore
from ._wheelcheck import Gap, check_wheelhouse
from ._wheelhouse import Target, resolve_target

__all__ = [
    "BlobStore",
    "BuildResult",
    "BuildSpec",
    "CompiledApp",
    "FileEntry",
    "Gap",
    "GitInfo",
    "Interpreter",
    "Manifest",
    "RefTree",
    "Target",
    "build",
    "cache_root",
    "canonical_json",
    "check_entry",
    "check_ref",
    "check_warnings",
    "check_wheelhouse",
    "clean",
    "compile_app",
    "controller_interpreter",
    "dependency_digest",
    "describe_lock",
    "describe_packages",
    "detect_source",
    "export_ref",
    "gate_env",
    "git_info",
    "host_misfit",
    "load_manifest",
    "pack",
    "platform_fits",
    "remove_cache",
    "resolve_ref",
    "resolve_target",
    "run_gate",
    "target_fits",
    "target_index",
    "target_of",
]
