#!/usr/bin/env python3
"""Checks deploy/docker/*.Dockerfile as far as possible without a Docker engine (none runs on
the build machines, so the images are never built here):

- multi-stage: a build stage, and a final stage that is not a Rust toolchain image;
- every COPY source (outside --from) exists in the repository and is not excluded by the
  Dockerfile's own .dockerignore (<name>.Dockerfile.dockerignore, as BuildKit reads it);
- the build context those COPYs produce is a loadable Cargo workspace: the copied files are
  staged in a temporary directory and `cargo metadata --locked --offline` runs there (every
  workspace member present, Cargo.lock current);
- `cargo build` names a workspace package (-p) and one of its binary targets (--bin), and the
  binary copied into the final stage and run by ENTRYPOINT is that binary;
- the final stage runs as a numeric, non-zero USER, and ENTRYPOINT is exec form.

Usage: check_dockerfiles.py DOCKERFILE...   (exit 1 on any problem)
"""

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def instructions(path):
    """(INSTRUCTION, argument text) with line continuations joined and comments dropped."""
    out, buf = [], ""
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not buf and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            buf += line
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def dockerignore(path):
    """Patterns of the Dockerfile-specific ignore file, in order ('!' negates)."""
    ignore = path + ".dockerignore"
    if not os.path.exists(ignore):
        return []
    with open(ignore, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


def ignored(rel, patterns):
    """Docker's rule: the last matching pattern wins; a directory pattern covers its contents."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        p = pattern[1:] if negate else pattern
        p = p.rstrip("/")
        candidates = [rel] + [rel.rsplit("/", i)[0] for i in range(1, rel.count("/") + 1)]
        if p.startswith("**/"):
            tail = p[3:]
            hit = any(fnmatch.fnmatch(part, tail) for part in rel.split("/"))
        else:
            hit = any(fnmatch.fnmatch(c, p) for c in candidates)
        if hit:
            result = not negate
    return result


def copy_sources(arg):
    """Sources and destination of a COPY without --from (flags dropped)."""
    words = [w for w in shlex.split(arg) if not w.startswith("--")]
    return words[:-1], words[-1]


def stage_context(copies, patterns, dest):
    """Copies what the COPY instructions would put under WORKDIR into `dest`."""
    for sources, target in copies:
        for src in sources:
            src_path = os.path.join(ROOT, src)
            if os.path.isdir(src_path):
                base = os.path.join(dest, target)
                for dirpath, dirnames, filenames in os.walk(src_path):
                    rel_dir = os.path.relpath(dirpath, ROOT)
                    dirnames[:] = [d for d in dirnames if not ignored(f"{rel_dir}/{d}", patterns)]
                    for fn in filenames:
                        rel = os.path.normpath(f"{rel_dir}/{fn}")
                        if ignored(rel, patterns):
                            continue
                        out = os.path.join(base, os.path.relpath(os.path.join(dirpath, fn), src_path))
                        os.makedirs(os.path.dirname(out), exist_ok=True)
                        shutil.copy2(os.path.join(dirpath, fn), out)
            else:
                out = os.path.join(dest, target, os.path.basename(src)) if target.endswith("/") \
                    else os.path.join(dest, target)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                shutil.copy2(src_path, out)


def check(path):
    problems = []
    rel_path = os.path.relpath(path, ROOT)
    ins = instructions(path)
    patterns = dockerignore(path)
    stages = [i for i, (word, _) in enumerate(ins) if word == "FROM"]
    if len(stages) < 2:
        problems.append("not multi-stage: a build stage and a minimal runtime stage are expected")
        return problems
    final = ins[stages[-1]:]
    build = ins[stages[0]:stages[-1]]
    final_image = final[0][1].split()[0]
    if final_image.startswith("rust") or "${" in final_image:
        problems.append(f"final stage image {final_image!r} is not a minimal pinned runtime image")

    copies = []
    for word, arg in build:
        if word == "COPY" and "--from" not in arg:
            sources, target = copy_sources(arg)
            for src in sources:
                if not os.path.exists(os.path.join(ROOT, src)):
                    problems.append(f"COPY source {src!r} does not exist in the repository")
                elif ignored(os.path.normpath(src), patterns):
                    problems.append(f"COPY source {src!r} is excluded by {os.path.basename(path)}.dockerignore")
            copies.append((sources, target))

    packages, bins = set(), set()
    for word, arg in build:
        if word == "RUN" and "cargo build" in arg:
            if "--locked" not in arg or "--release" not in arg:
                problems.append("cargo build must use --release --locked")
            packages |= set(re.findall(r"(?:-p|--package)\s+([\w-]+)", arg))
            bins |= set(re.findall(r"--bin\s+([\w-]+)", arg))
    if len(packages) != 1 or len(bins) != 1:
        problems.append(f"expected one `-p PACKAGE --bin BINARY` in cargo build, found {packages} {bins}")
        return problems
    package, binary = packages.pop(), bins.pop()

    with tempfile.TemporaryDirectory() as tmp:
        try:
            stage_context(copies, patterns, tmp)
        except OSError as e:
            problems.append(f"cannot stage the build context: {e}")
            return problems
        result = subprocess.run(
            ["cargo", "metadata", "--locked", "--offline", "--no-deps", "--format-version", "1"],
            cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0:
            problems.append("the build context is not a loadable workspace "
                            f"(cargo metadata --locked): {result.stderr.strip()[-800:]}")
            return problems
        meta = json.loads(result.stdout)
    pkg = next((p for p in meta["packages"] if p["name"] == package), None)
    if pkg is None:
        problems.append(f"-p {package}: no such workspace package")
        return problems
    pkg_bins = [t["name"] for t in pkg["targets"] if "bin" in t["kind"]]
    if binary not in pkg_bins:
        problems.append(f"--bin {binary}: package {package} has binaries {pkg_bins}")

    final_copies = [shlex.split(arg) for word, arg in final if word == "COPY"]
    dests = [w[-1] for w in final_copies if any(x.startswith("--from") for x in w)]
    if not any(os.path.basename(d) == binary for d in dests):
        problems.append(f"the final stage copies {dests}, not the binary {binary}")
    users = [arg for word, arg in final if word == "USER"]
    if not users or not re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]):
        problems.append(f"final USER must be a numeric non-root uid[:gid], found {users}")
    entry = [arg for word, arg in final if word == "ENTRYPOINT"]
    try:
        argv = json.loads(entry[-1]) if entry else None
    except json.JSONDecodeError:
        argv = None
    if not isinstance(argv, list) or not argv:
        problems.append("ENTRYPOINT must be exec form (a JSON array)")
    elif argv[0] not in dests:
        problems.append(f"ENTRYPOINT runs {argv[0]}, which the final stage does not copy in")
    print(f"{rel_path}: {package} --bin {binary}, {len(copies)} COPY sources present, "
          f"workspace loads from the staged context, final stage {final_image} as {users[-1] if users else '?'}")
    return problems


def main():
    failed = 0
    for path in sys.argv[1:]:
        for p in check(os.path.abspath(path)):
            print(f"FAIL {os.path.relpath(path, ROOT)}: {p}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
