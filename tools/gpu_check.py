"""The Python steps of tools/gpu_check.sh, each a subcommand that adds its result to one JSON file (--result,
under the step's name), and its preparation.

`prepare` (bash tools/gpu_check.sh --prepare, where PyPI can be reached) makes what the GPU machine needs and
cannot fetch: a real copy of the data in .gpu_data/ and, in .whl/, the wheels of every distribution the project
needs (requirements.txt, transitively) at the version installed here, where the tests pass, for the GPU image's
Python, less what the image brings (its CUDA build of torch, and its compiled packages); then it checks that what
travels stays under the device tool's 64 MiB and prints the command to run there.

The steps there: `plan` (the steps and their shares of the budget, written before the first one runs), `wheels`
(installs the wheels whose version the machine lacks), `env` (versions; every requirement checked as the machine
has it), `syncs` (host syncs of E3's training loop), `suite` (run_all_experiments.py timed phase by phase),
`record` (a step the shell ran) and `summary`. Each runs on its own too, e.g.
`python tools/gpu_check.py --result out.json syncs --model random:vit-b16 --data DIR`.
"""

import argparse
import collections
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):   # run as a script (python tools/X.py): the repository root holds the library
    sys.path.insert(0, str(REPO))
# torch and the rest of the library are imported by the steps that use them: recording a step stays quick.
from clip_adapt.base import UserError, write_json  # noqa: E402

# The steps in the order they run, each with its share of the budget in seconds, fixed before the first one starts:
# the questions in the order they matter (the CUDA tests; every classification experiment at ViT-B/16 size; E4 and
# E6 compiled against eager; one E8 step at ViT-L/14 + GPT-2 size; the host syncs of the step loop; the whole suite
# by phase). A step may run until the sum of its share and those before it: what an earlier step leaves unused
# passes on, and no step eats a later one's share. They add up to BUDGET_S, so that one call ends inside 9 minutes;
# a smaller --budget cuts steps from the end, recorded as not run.
STEPS = {"wheels": 30, "env": 20, "cuda_tests": 60, "bench": 110, "bench_compile": 130, "e8_step": 50, "syncs": 40,
         "suite": 90}
BUDGET_S = sum(STEPS.values())
DEVICE_TIMEOUT_S = 600    # the device tool's limit for one command, which the budget stays well inside
TRAVEL_LIMIT = 64 * 2 ** 20   # the device tool's limit on the working tree plus the carried folders
DATA_FOLDER, WHEEL_FOLDER = REPO / ".gpu_data", REPO / ".whl"   # both in .gitignore: they travel as `carry`

# The lent H100/H200 machines' image ('cuda'), as /work/.library/device/KINDS.md records it (2026-11, from
# sessions' own output there): python3 is Python 3.12.3 with torch 2.11.0+cu130 and torchvision 0.26.0, and these
# distributions. Python 3.12.3 is Ubuntu 24.04's (glibc 2.39); the wheels ask for manylinux 2.28 at most.
IMAGE_PYTHON = "3.12.3"
IMAGE_VERSIONS = {"torch": "2.11.0", "torchvision": "0.26.0"}
IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split())
# Never carried: the image's CUDA build of torch (with what it needs) matches its driver, and weighs gigabytes.
CUDA_STACK, CUDA_PREFIXES = frozenset({"torch", "torchvision", "torchaudio", "triton"}), ("nvidia-", "cuda-")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", *(f"manylinux_2_{n}_x86_64" for n in range(26, 16, -1)),
             "manylinux2014_x86_64", "manylinux1_x86_64"]   # pip matches each tag exactly: every glibc up to 2.28
# pycocoevalcap ships its Java scorers (METEOR, SPICE and the PTB tokenizer's jars, METEOR's paraphrase table: 99.5
# MiB of its wheel; 17 kB remain); the project scores CIDEr-D, which is plain Python (clip_adapt/captioning.py), so
# its wheel travels with its Python modules and its metadata only.
SLIM_WHEELS = {"pycocoevalcap": lambda member: member.endswith(".py") or ".dist-info/" in member}
CLASS_NAMES = ["glioma", "meningioma", "no tumor", "pituitary"]


def record(result: Path, step: str, value=None, status: dict | None = None) -> None:
    """Adds one step's result (and, from the shell, its status) to the JSON file, rewritten whole each time, so
    that a run cut short keeps every step that finished."""
    results = json.loads(result.read_text()) if result.exists() else {}
    if value is not None:
        results[step] = value
    if status is not None:
        results.setdefault("steps", {}).setdefault(step, {}).update(status)
    write_json(result, results)


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- what the project needs

def project_requirements() -> list[Requirement]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [Requirement(text) for text in (line.split("#")[0].strip() for line in lines) if text]


def marker_environment(python_full_version: str | None = None) -> dict:
    """The environment markers are evaluated in: this interpreter's, or CPython `python_full_version` on x86-64
    Linux (the GPU image's)."""
    environment = default_environment()
    if python_full_version:
        environment.update(python_full_version=python_full_version, implementation_version=python_full_version,
                           python_version=".".join(python_full_version.split(".")[:2]), implementation_name="cpython",
                           platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
                           platform_machine="x86_64", os_name="posix")
    return environment


def in_cuda_stack(name: str) -> bool:
    return name in CUDA_STACK or name.startswith(CUDA_PREFIXES)


def requirement_closure(requirements: list[Requirement], environment: dict, version_of=installed
                        ) -> tuple[dict[str, str | None], list[tuple[str, Requirement]]]:
    """Every distribution that `requirements` need, transitively, where `environment`'s markers hold, with the
    version version_of finds (None: not installed); and every requirement met on the way, as (who asks,
    requirement), for checking. The walk does not enter the CUDA stack: torch's own needs come with its build."""
    versions, edges, walked, seen_edges = {}, [], collections.defaultdict(set), set()
    queue = collections.deque(("requirements.txt", r) for r in requirements)
    while queue:
        asker, requirement = queue.popleft()
        if (asker, str(requirement)) in seen_edges:
            continue
        seen_edges.add((asker, str(requirement)))
        edges.append((asker, requirement))
        name = canonicalize_name(requirement.name)
        if name not in versions:
            versions[name] = version_of(name)
        if versions[name] is None or in_cuda_stack(name):
            continue
        for extra in sorted(({""} | set(requirement.extras)) - walked[name]):
            walked[name].add(extra)
            for text in importlib.metadata.requires(name) or []:
                needed = Requirement(text)
                marker_holds = (needed.marker.evaluate({**environment, "extra": extra}) if needed.marker
                                else extra == "")
                if marker_holds:
                    queue.append((name, needed))
    return versions, edges


def unsatisfied(versions: dict[str, str | None], edges: list[tuple[str, Requirement]]) -> list[str]:
    problems = []
    for asker, requirement in edges:
        found = versions.get(canonicalize_name(requirement.name))
        if found is None or not requirement.specifier.contains(found, prereleases=True):
            problems.append(f"{asker} needs {requirement}, found {found or 'none'}")
    return problems


def freeze_versions() -> dict[str, str]:
    """`python -m pip freeze` of this interpreter, the one the tests pass with: {name: version}."""
    lines = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return {canonicalize_name(name): version for name, _, version in (line.partition("==") for line in lines)
            if version}


def is_pure(name: str) -> bool:
    """Whether the installed distribution came from a pure-Python wheel (the same wheel on every Python 3)."""
    wheel = importlib.metadata.distribution(name).read_text("WHEEL") or ""
    return "Root-Is-Purelib: true" in wheel


def wheel_plan(python_full_version: str = IMAGE_PYTHON) -> dict:
    """What .whl must hold: every distribution the project needs under the GPU image's Python, each at the
    version `pip freeze` reports here, less what the image brings: its CUDA stack, and the compiled distributions
    it holds (built against its own numpy and Python; carrying them would replace its builds, and numpy, scipy,
    pandas and pyarrow alone weigh more than the 64 MiB that may travel). Pure-Python ones travel even where the
    image holds another version of them (its transformers 5.17, huggingface-hub 1.33): the machine installs those
    whose version it lacks. Also checks each requirement, with the image's torch and torchvision in place of
    this machine's."""
    tested = freeze_versions()
    versions, edges = requirement_closure(project_requirements(), marker_environment(python_full_version))
    problems = [f"{name} is needed under Python {python_full_version} but not installed here: install it, run the "
                f"tests, then prepare again" for name, version in versions.items() if version is None]
    problems += [f"{name}: importlib finds {version}, pip freeze {tested.get(name)}: two copies installed?"
                 for name, version in versions.items() if version and tested.get(name) != version]
    with_image = {**versions, **{name: version for name, version in IMAGE_VERSIONS.items() if name in versions}}
    problems += [f"on the GPU image: {problem}" for problem in unsatisfied(with_image, edges)]
    carry, image = {}, {}
    for name, version in sorted(versions.items()):
        if version is None:
            continue
        if in_cuda_stack(name):
            image[name] = {"tested": version, "there": IMAGE_VERSIONS.get(name), "why": "the image's CUDA build"}
        elif name in IMAGE_PACKAGES and not is_pure(name):
            image[name] = {"tested": version, "why": "compiled: the image's own build"}
        else:
            carry[name] = version
    return {"python": python_full_version, "platforms": PLATFORMS, "carry": carry, "image": image,
            "problems": problems}


# --------------------------------------------------------------------------- wheels

def wheel_identity(path: Path) -> tuple[str, str]:
    """(name, version) from the wheel's own METADATA."""
    with zipfile.ZipFile(path) as wheel:
        metadata = next(m for m in wheel.namelist() if m.count("/") == 1 and m.endswith(".dist-info/METADATA"))
        fields = dict(line.split(": ", 1) for line in wheel.read(metadata).decode().splitlines()
                      if line.startswith(("Name: ", "Version: ")))
    return canonicalize_name(fields["Name"]), fields["Version"]


def compare_wheels(folder: Path, pinned: dict[str, str]) -> list[str]:
    """What differs between the folder's wheels and the pinned versions: a pinned distribution without its wheel,
    a wheel of another version, two wheels of one distribution (they stop the whole install), a wheel not pinned."""
    found = collections.defaultdict(list)
    for wheel in sorted(Path(folder).glob("*.whl")):
        name, version = wheel_identity(wheel)
        found[name].append(version)
    problems = [f"{name}: no wheel for {version}" for name, version in pinned.items() if name not in found]
    for name, versions in found.items():
        if len(versions) > 1:
            problems.append(f"{name}: {len(versions)} wheels ({', '.join(versions)}); keep one")
        elif name not in pinned:
            problems.append(f"{name}: wheel {versions[0]} is not among the pinned distributions")
        elif Version(versions[0]) != Version(pinned[name]):
            problems.append(f"{name}: wheel {versions[0]}, installed where the tests pass {pinned[name]}")
    return problems


def slim_wheel(path: Path, keep) -> int:
    """Rewrites the wheel with only the members keep() accepts, its RECORD to match; returns the bytes saved."""
    with zipfile.ZipFile(path) as source:
        members = source.infolist()
        if all(keep(m.filename) for m in members):
            return 0
        temporary = path.with_name(f".{path.name}.partial")
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as target:
            for member in members:
                if not keep(member.filename):
                    continue
                data = source.read(member)
                if member.filename.endswith(".dist-info/RECORD"):
                    data = "".join(line for line in data.decode().splitlines(keepends=True)
                                   if keep(line.split(",")[0])).encode()
                target.writestr(member, data)
    before = path.stat().st_size
    os.replace(temporary, path)
    return before - path.stat().st_size


def download_wheels(folder: Path, plan: dict) -> None:
    """pip download of each pinned wheel not in the folder yet, none of its dependencies (the plan holds them),
    for the GPU image's Python on x86-64 Linux; wheels of another version or distribution are removed first. (A
    slimmed wheel is kept as it is: pip would fetch it again, its hash no longer the index's.)"""
    folder.mkdir(parents=True, exist_ok=True)
    pinned, present = plan["carry"], set()
    for wheel in folder.glob("*.whl"):
        name, version = wheel_identity(wheel)
        if pinned.get(name) is None or Version(pinned[name]) != Version(version) or name in present:
            wheel.unlink()
        else:
            present.add(name)
    missing = [f"{name}=={version}" for name, version in pinned.items() if name not in present]
    if missing:
        platforms = [argument for tag in plan["platforms"] for argument in ("--platform", tag)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", plan["python"], "--implementation", "cp", *platforms, "--dest",
                        str(folder), *missing], check=True)
    for wheel in folder.glob("*.whl"):
        name, _ = wheel_identity(wheel)
        if name in SLIM_WHEELS:
            saved = slim_wheel(wheel, SLIM_WHEELS[name])
            if saved:
                print(f"{wheel.name}: {saved / 2 ** 20:.1f} MiB of unused Java scorers left out")


def wheels(args) -> dict:
    """Installs, with no index and no dependency resolution (prepare resolved them), the folder's wheels whose
    distribution this machine lacks or holds at another version, into --target; the caller puts it first on
    PYTHONPATH, so that they shadow the machine's own. `env` then checks every requirement as it stands."""
    install, same = {}, []
    for wheel in sorted(Path(args.folder).glob("*.whl")):
        name, version = wheel_identity(wheel)
        there = installed(name)
        if there is not None and Version(there) == Version(version):
            same.append(name)
        else:
            install[name] = {"wheel": wheel.name, "version": version, "machine_has": there}
    listed = ", ".join(f"{name} {w['version']} (here {w['machine_has']})" for name, w in install.items())
    print(f"wheels: installing {listed or 'nothing'}; at the same version already: {', '.join(same) or 'none'}",
          flush=True)
    if install:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", args.target,
                        *(str(Path(args.folder) / w["wheel"]) for w in install.values())], check=True)
    return {"installed": install, "already_there": same}


# --------------------------------------------------------------------------- prepare

def default_data_source() -> Path:
    """../shared/data/brain_mri beside the checkout; from a git worktree elsewhere, beside the main checkout."""
    candidates = [REPO.parent / "shared" / "data" / "brain_mri"]
    common_dir = subprocess.run(["git", "rev-parse", "--git-common-dir"], cwd=REPO, capture_output=True, text=True)
    if common_dir.returncode == 0:
        main_checkout = (REPO / common_dir.stdout.strip()).resolve().parent
        candidates.append(main_checkout.parent / "shared" / "data" / "brain_mri")
    return next((c for c in candidates if c.is_dir()), candidates[0])


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(files, bytes) under the folder; a link counts as the link it travels as."""
    files = [p for p in folder.rglob("*") if p.is_symlink() or p.is_file()]
    return len(files), sum(p.lstat().st_size for p in files)


def copy_data(source: Path, target: Path) -> tuple[int, int]:
    """A real copy of the image folder (links followed: the device tool sends a link as a link), made beside
    the target and renamed into place, so that an interrupted copy leaves the old one whole."""
    if not (source / "train").is_dir() or not (source / "test").is_dir():
        raise UserError(f"data folder {source} has no train/ and test/: pass --data the image folder "
                        f"(train/<class>/*, test/<class>/*)")
    temporary = target.with_name(f".{target.name}.partial")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(source, temporary, symlinks=False)
    copied, wanted = folder_bytes(temporary), (len([p for p in source.rglob("*") if p.is_file()]),
                                               sum(p.stat().st_size for p in source.rglob("*") if p.is_file()))
    if copied != wanted or any(p.is_symlink() for p in temporary.rglob("*")):
        raise UserError(f"the copy of {source} holds {copied} (files, bytes), the source {wanted}: copy again")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(temporary, target)
    return copied


def travelling(carried: list[Path]) -> dict[str, int]:
    """Bytes that one device call sends: the checkout's tracked and untracked-not-ignored files, shared/ where the
    checkout has one, and each carried folder."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    paths = [REPO / p for p in listed if p and not p.startswith("shared/")]
    sizes = {"tree": sum(p.lstat().st_size for p in paths if p.is_symlink() or p.is_file())}
    for folder in ([REPO / "shared"] if (REPO / "shared").is_dir() else []) + carried:
        sizes[folder.name] = folder_bytes(folder)[1]
    return sizes


def device_command(data: Path) -> str:
    return f'bash tools/gpu_check.sh "$OUT" --data {data.relative_to(REPO)} --wheels {WHEEL_FOLDER.name}'


def prepare(args) -> None:
    source = Path(args.data).expanduser().resolve() if args.data else default_data_source()
    if not source.is_dir():
        raise UserError(f"data folder {source} does not exist: pass --data the brain MRI folder "
                        f"(../shared/data/brain_mri beside a checkout)")
    started = time.perf_counter()
    DATA_FOLDER.mkdir(exist_ok=True)
    data = DATA_FOLDER / source.name
    files, data_bytes = copy_data(source, data)
    print(f"data: {source} copied to {data.relative_to(REPO)} ({files} files, {data_bytes / 2 ** 20:.1f} MiB)")
    plan = wheel_plan(args.python_version)
    if plan["problems"]:
        raise UserError("the pinned wheels cannot be worked out: " + "; ".join(plan["problems"]))
    download_wheels(WHEEL_FOLDER, plan)
    problems = compare_wheels(WHEEL_FOLDER, plan["carry"])
    if problems:
        raise UserError(f"{WHEEL_FOLDER.name}/ does not match the versions installed here: " + "; ".join(problems))
    write_json(WHEEL_FOLDER / "plan.json", {k: v for k, v in plan.items() if k != "problems"})
    sizes = travelling([DATA_FOLDER, WHEEL_FOLDER])
    total = sum(sizes.values())
    print(f"wheels: {len(plan['carry'])} in {WHEEL_FOLDER.name}/, each at the version pip freeze gives here, for "
          f"Python {plan['python']} (x86-64 Linux, manylinux up to 2.28): {', '.join(plan['carry'])}")
    reasons = collections.defaultdict(list)
    for name, left in plan["image"].items():
        reasons[left["why"]].append(name)
    print("left to the GPU image: " + "; ".join(f"{why}: {', '.join(names)}" for why, names in reasons.items()))
    print("what travels: " + " + ".join(f"{name} {size / 2 ** 20:.1f} MiB" for name, size in sizes.items())
          + f" = {total / 2 ** 20:.1f} MiB of the device tool's {TRAVEL_LIMIT / 2 ** 20:.0f} MiB")
    if total > TRAVEL_LIMIT:
        raise UserError(f"what travels is {total / 2 ** 20:.1f} MiB, over the device tool's "
                        f"{TRAVEL_LIMIT / 2 ** 20:.0f} MiB: leave something out")
    carry = json.dumps([f.name for f in (DATA_FOLDER, WHEEL_FOLDER)])
    print(f"prepared in {time.perf_counter() - started:.0f} s. On the GPU machine, from the checkout's root (the "
          f"device tool's run):\n  command:   {device_command(data)}\n  carry:     {carry}\n"
          f"  timeout_s: {DEVICE_TIMEOUT_S} (the check ends itself within its {BUDGET_S} s budget)")


# --------------------------------------------------------------------------- the steps on the machine

def plan(args) -> dict:
    """The steps this run will take, each with its share and the time by which it must end (the sum of its share
    and those before it; the last one also gets what --budget holds beyond the shares, e.g. the suite alone in a
    second call), written before the first one runs; steps past --budget are recorded as not run. Prints one line
    per step for the shell: name, share, deadline (or - where not run)."""
    if args.no_wheels and "wheels" in args.steps and args.steps != list(STEPS):
        raise UserError("--steps wheels needs --wheels DIR")
    chosen = [name for name in STEPS if name in args.steps and not (args.no_wheels and name == "wheels")]
    steps, deadline = {}, 0
    for name in chosen:
        deadline += STEPS[name]
        if name == chosen[-1]:
            deadline = max(deadline, args.budget)
        fits = deadline <= args.budget
        steps[name] = {"status": "pending" if fits else "not run",
                       "reason": None if fits else f"beyond the budget of {args.budget} s: it would end at "
                                                   f"{deadline} s",
                       "share_s": STEPS[name], "deadline_s": deadline if fits else None, "seconds": None}
        print(name, STEPS[name], deadline if fits else "-")
    return steps


def environment(args) -> dict:
    import torch
    versions, edges = requirement_closure(project_requirements(), marker_environment())
    problems = unsatisfied(versions, edges)
    tested = {}
    if args.plan and Path(args.plan).exists():
        wheel_plan_there = json.loads(Path(args.plan).read_text())
        tested = {**wheel_plan_there["carry"], **{n: w["tested"] for n, w in wheel_plan_there["image"].items()}}
    found = {"python": platform.python_version(), "platform": platform.platform(),
             "packages": versions, "requirements_unsatisfied": problems,
             "differs_from_tested": {name: {"here": versions.get(name), "tested": version}
                                     for name, version in tested.items()
                                     if versions.get(name) is None or Version(versions[name]) != Version(version)},
             "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
             "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        found.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2 ** 30, 1),
                     multiprocessors=properties.multi_processor_count,
                     compute_capability=f"{properties.major}.{properties.minor}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        found["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        found["nvidia_smi"] = f"not run: {error}"
    for key, value in found.items():
        print(f"{key}: {value}")
    if problems:
        found["failed"] = f"{len(problems)} requirements unsatisfied: " + "; ".join(problems)
    return found


def syncs(args) -> dict:
    """Runs E3 (one epoch by default: a few steps) with torch.cuda.set_sync_debug_mode("warn") and counts the
    host syncs: by the phase they fall in (clip_adapt/timing.py) and by the innermost line of this project's
    code that caused them. A sync whose count grows with the number of steps is one inside the step loop."""
    import torch

    from clip_adapt import timing
    from clip_adapt.runner import run_experiment
    found = collections.Counter()
    by_phase = collections.Counter()

    def remember(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        ours = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(f"{REPO}{os.sep}")
                and not f.filename.startswith((f"{REPO / 'tools'}{os.sep}", f"{REPO / '.venv'}{os.sep}"))]
        where = f"{Path(ours[-1].filename).relative_to(REPO)}:{ours[-1].lineno} {ours[-1].name}" if ours else filename
        found[where] += 1
        by_phase[timing.current() or "outside phases"] += 1

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="gpu_check_syncs_") as out:
        argv = ["--model", args.model, "--data", args.data, "--epochs", str(args.epochs), "--quiet",
                "--noise-levels", "0", *(["--smoke"] if args.smoke else []), "--output-dir", out]
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = remember
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                code = run_experiment("E3_shallow_vpt", argv)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        metrics_path = Path(out) / "E3_shallow_vpt" / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    train_images, batch = metrics.get("num_images", {}).get("train", 0), 32
    result = {"exit_code": code, "counted": cuda, "epochs": args.epochs,
              "steps": args.epochs * -(-train_images // batch) if train_images else None,
              "syncs": sum(found.values()) if cuda else None, "by_phase": dict(by_phase),
              "by_place": dict(found.most_common())}
    print(json.dumps(result, indent=1))
    if code != 0:
        result["failed"] = f"E3 exited with {code}"
    return result


def suite(args) -> dict:
    """run_all_experiments.py in a fresh process, timed whole; each experiment's metrics.json gives its phases."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_suite_") as out:
        return timed_suite(args, Path(out))


def timed_suite(args, out: Path) -> dict:
    command = [sys.executable, str(REPO / "run_all_experiments.py"), "--model", args.model, "--data", args.data,
               "--seed", "0", "--epochs", str(args.epochs), "--quiet", "--output-dir", str(out),
               *(["--smoke"] if args.smoke else []), *(["--compile"] if args.compile else []),
               *(["--experiments", *args.experiments] if args.experiments else [])]
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    try:
        code = subprocess.run(command, cwd=REPO, timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        code = "timed out"
        print(f"suite stopped after {args.timeout:.0f} s: the experiments that finished are recorded", flush=True)
    total = time.perf_counter() - started
    experiments, phases = {}, collections.Counter()
    for metrics_path in sorted(out.glob("E*/metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        experiments[metrics["experiment"]] = {"timings": metrics["timings"], "epochs_run": metrics["epochs_run"],
                                              "weights": metrics["weights"], "test_accuracy": metrics["test_accuracy"]}
        phases.update({k: v for k, v in metrics["timings"].items() if k != "total"})
    inside = sum(e["timings"]["total"] for e in experiments.values())
    # Outside every experiment: the interpreter's imports, then the summary and report.html at the end.
    result = {"exit_code": code, "total_s": round(total, 2), "compile": args.compile, "epochs": args.epochs,
              "model": args.model, "data": args.data,
              "phases_s": {**{k: round(v, 2) for k, v in phases.items()},
                           "outside_experiments": round(total - inside, 2)},
              "experiments": experiments}
    print(json.dumps({k: v for k, v in result.items() if k != "experiments"}, indent=1))
    if code != 0:
        result["failed"] = f"run_all_experiments.py: {code if code == 'timed out' else f'exit {code}'}; "
        result["failed"] += f"{len(experiments)} experiments finished"
    return result


def bench_rows(bench: dict) -> dict[str, dict]:
    return {row["experiment"]: row for row in bench.get("experiments", [])}


def summary(result: Path) -> bool:
    """The figures to read first, as a few lines (the device tool returns the end of the output); whether every
    step that ran ended well."""
    results = json.loads(result.read_text())
    print("\n=== gpu_check summary ===")
    for name, step in results.get("steps", {}).items():
        seconds = f" in {step['seconds']:.0f} s" if step.get("seconds") is not None else ""
        print(f"{name}: {step['status']}{seconds}" + (f" ({step['reason']})" if step.get("reason") else ""))
    env = results.get("env", {})
    print(f"gpu {env.get('gpu', 'none')}; {env.get('nvidia_smi', '')}; torch {env.get('packages', {}).get('torch')} "
          f"CUDA {env.get('torch_cuda')}; differs from tested: {sorted(env.get('differs_from_tested', {}))}")

    def row_text(row):
        if "error" in row:
            return f"{row['experiment'].split('_')[0]} {row['error']}"
        step = f"{1000 * row['train_step_s']:.0f} ms/step, {row['train_images_per_s']:.0f} img/s, " \
               f"MFU {100 * row['train_mfu']:.0f}%, " if "train_step_s" in row else ""
        return (f"{row['experiment'].split('_')[0]} {step}eval {row['eval_images_per_s']:.0f} img/s, "
                f"{row['peak_memory_mb'] / 1024:.1f} GiB")
    for key in ("bench", "bench_compile", "e8_step"):
        if results.get(key):
            print(f"{key} ({results[key]['model']}, batch {results[key]['batch_size']}): "
                  + "; ".join(row_text(r) for r in results[key]["experiments"]))
    eager, compiled = bench_rows(results.get("bench", {})), bench_rows(results.get("bench_compile", {}))
    for name, row in compiled.items():
        if "train_step_s" in row and "train_step_s" in eager.get(name, {}):
            print(f"compile {name.split('_')[0]}: {eager[name]['train_step_s'] / row['train_step_s']:.2f}x eager's "
                  f"training speed; warm-up (compiling) {row['train_warmup_s']:.0f} s against "
                  f"{eager[name]['train_warmup_s']:.1f} s")
    if "syncs" in results:
        print(f"E3 syncs: {results['syncs']['syncs']} in {results['syncs']['steps']} steps; by phase "
              f"{results['syncs']['by_phase']}")
    if "suite" in results:
        print(f"suite: {results['suite']['total_s']} s, exit {results['suite']['exit_code']}; "
              f"{results['suite']['phases_s']}")
    return not any(step["status"] in ("failed", "timed out") for step in results.get("steps", {}).values())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result", type=Path, help="the JSON file the step's result is added to")
    p.add_argument("--step", help="the name to record it under [default: the subcommand's]")
    steps = p.add_subparsers(dest="command", required=True)
    pr = steps.add_parser("prepare", help="the data copy and the wheels for the GPU machine; prints the command")
    pr.add_argument("--data", help="the image folder to copy [default: ../shared/data/brain_mri beside the checkout]")
    pr.add_argument("--python-version", default=IMAGE_PYTHON, help="the GPU image's Python")
    pl = steps.add_parser("plan", help="the steps of this run and their shares of the budget")
    pl.add_argument("--budget", type=int, default=BUDGET_S)
    pl.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    pl.add_argument("--no-wheels", action="store_true", help="no --wheels folder: the wheels step does not apply")
    e = steps.add_parser("env", help="python, packages, torch, CUDA, GPU and driver; every requirement checked")
    e.add_argument("--plan", help="the plan.json that prepare wrote beside the wheels: versions where tests pass")
    w = steps.add_parser("wheels", help="install the wheels of a folder whose version this machine lacks")
    w.add_argument("folder")
    w.add_argument("--target", required=True)
    s = steps.add_parser("syncs", help="host syncs while E3 trains, by phase and place")
    r = steps.add_parser("suite", help="run_all_experiments.py, timed and split into phases")
    for sub in (s, r):
        sub.add_argument("--model", default="random:vit-b16")
        sub.add_argument("--data", required=True)
        sub.add_argument("--epochs", type=int, default=1)
        sub.add_argument("--smoke", action="store_true")
    r.add_argument("--compile", action="store_true")
    r.add_argument("--timeout", type=float, help="stop the suite after this many seconds; what finished counts")
    r.add_argument("--experiments", nargs="+")
    steps.add_parser("summary", help="print the main figures of the result file")
    c = steps.add_parser("record", help="record a step the shell ran: its status, and a JSON file it wrote")
    c.add_argument("--status", required=True, choices=["ok", "failed", "timed out", "skipped", "not run"])
    c.add_argument("--reason")
    c.add_argument("--seconds", type=float)
    c.add_argument("--limit", type=float)
    c.add_argument("--json", type=Path, help="a JSON file the step wrote, recorded whole")
    args = p.parse_args()
    if args.command == "prepare":
        prepare(args)
        return
    if args.result is None:
        raise UserError(f"{args.command} needs --result FILE")
    if args.command == "record":
        value = json.loads(args.json.read_text()) if args.json and args.json.exists() else None
        record(args.result, args.step, value, {"status": args.status, "reason": args.reason,
                                               "seconds": args.seconds, "limit_s": args.limit})
        return
    if args.command == "summary":
        if not summary(args.result):
            sys.exit(1)
        return
    if args.command == "plan":
        record(args.result, "steps", plan(args))
        return
    run = {"env": environment, "wheels": wheels, "syncs": syncs, "suite": suite}
    value = run[args.command](args)
    record(args.result, args.step or args.command, value)
    if value.get("failed"):
        print(f"{args.command}: {value['failed']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    try:   # as common.run reports a user's mistake, without importing torch: recording a step stays quick
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
