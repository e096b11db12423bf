"""Device profiles: how much memory an edge GPU gives edgeqra, and which GPTQ kernels it runs.

A profile is one TOML file named ``<name>.toml``. Built-in profiles ship in the wheel as
``edgeqra.builtin_profiles``; users add or override them by name from ``$EDGEQRA_PROFILES``
(``os.pathsep``-separated folders), ``<user config dir>/edgeqra/profiles`` and any folders
passed as ``extra_dirs`` -- later folders win.

The budget is ``memory - os share``; the memory model's total M(C), which already includes the
runtime reserve, must not exceed it. 1 GiB = 2**30 bytes, 1 MiB = 2**20 bytes.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

import platformdirs

from edgeqra.errors import ProfileError

__all__ = [
    "BudgetMode",
    "DeviceProfile",
    "FinetuneWorkload",
    "InferenceWorkload",
    "KERNELS",
    "KernelSpec",
    "list_profiles",
    "load_profile",
    "parse_profile",
    "profile_dirs",
]

_GIB = 2**30
_MIB = 2**20
_SEARCH_BITS = frozenset({2, 3, 4, 8})
_ENV_VAR = "EDGEQRA_PROFILES"
_BUILTIN_PACKAGE = "edgeqra.builtin_profiles"
_NAME_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_CC_RE = re.compile(r"^(\d{1,2})\.(\d)$")


class BudgetMode(str, Enum):
    """Which workload the memory budget is checked for by default."""

    INFERENCE = "inference"
    FINETUNE = "finetune"
    BOTH = "both"


@dataclass(frozen=True)
class KernelSpec:
    """What one GPTQModel kernel can run, so a profile cannot promise bits its GPU can't."""

    backend: str  # GPTQModel BACKEND value
    bits: frozenset[int]
    min_cc: tuple[int, int]
    max_cc: tuple[int, int] | None = None


# GPTQModel 7.6.0 (pyproject pins >=7.6,<7.7), gptqmodel/nn_modules/qlinear/*.py:
#   marlin.py      SUPPORTS_BITS=[4, 8]; _MARLIN_MIN_CAPABILITY=(7, 5) ("GPTQ Marlin on compute
#                  capability 7.5 requires dtype=torch.float16"; sm80+ takes bf16 too).
#   machete.py     SUPPORTS_BITS=[4, 8]; utils/machete.py _MACHETE_REQUIRED_COMPUTE_CAPABILITY=(9, 0)
#                  ("Machete kernel is Hopper-only (SM90)").
#   exllamav2.py   SUPPORTS_BITS=[4]; CUDA only, no capability check in GPTQModel; the ExLlamaV2
#                  kernels use half2 arithmetic, so we require Pascal (6.0) or newer.
#   tritonv2.py    SUPPORTS_BITS=[2, 4, 8]; Triton's README: NVIDIA GPUs of compute capability 7.0+.
#   torch.py       SUPPORTS_BITS=[2, 3, 4, 5, 6, 7, 8]; DEVICE.ALL (plain PyTorch, no floor).
# Bits outside edgeqra's search set {2, 3, 4, 8} are dropped.
KERNELS: Mapping[str, KernelSpec] = {
    "marlin": KernelSpec("gptq_marlin", frozenset({4, 8}), (7, 5)),
    "machete": KernelSpec("gptq_machete", frozenset({4, 8}), (9, 0), (9, 0)),
    "exllama_v2": KernelSpec("gptq_exllama_v2", frozenset({4}), (6, 0)),
    "triton": KernelSpec("gptq_triton", frozenset({2, 4, 8}), (7, 0)),
    "torch": KernelSpec("gptq_torch", frozenset({2, 3, 4, 8}), (0, 0)),
}


def _where(path: Path | None, name: str | None = None) -> str:
    """Name the file (or the profile when it has none) so every message says where to look."""
    if path is not None:
        return f"device profile {str(path)!r}"
    return f"device profile {name!r}" if name else "device profile"


def _closest(word: str, choices: Sequence[str]) -> str:
    """A ' Did you mean ...?' hint, or nothing, so typos get a one-glance fix."""
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean `{match[0]}`?" if match else ""


@dataclass(frozen=True)
class InferenceWorkload:
    """Generation shape that sizes the KV cache and activations."""

    batch: int
    context: int

    def __post_init__(self) -> None:
        """Reject non-positive shapes early, before they turn into a zero-byte estimate."""
        for key in ("batch", "context"):
            _check_positive_int(getattr(self, key), f"inference.{key}", None)


@dataclass(frozen=True)
class FinetuneWorkload:
    """LoRA-tuning shape that sizes activations, gradients and optimizer state."""

    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool

    def __post_init__(self) -> None:
        """Reject non-positive shapes early, before they turn into a zero-byte estimate."""
        for key in ("micro_batch", "seq_len"):
            _check_positive_int(getattr(self, key), f"finetune.{key}", None)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ProfileError(
                f"{_where(None)}: `finetune.gradient_checkpointing` = "
                f"{self.gradient_checkpointing!r} must be true or false."
            )


def _check_positive_int(value: Any, key: str, path: Path | None) -> None:
    """Workload sizes must be whole positive numbers; bool is not a number here."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ProfileError(
            f"{_where(path)}: `{key}` = {value!r} must be a positive integer; set e.g. `{key} = 1`."
        )


@dataclass(frozen=True)
class DeviceProfile:
    """One device's memory budget and runnable kernels; the search checks M(C) against it."""

    name: str
    display_name: str
    memory_gib: float
    unified_memory: bool
    os_reserved_gib: float
    runtime_reserve_mib: float
    compute_capability: str
    kernels: tuple[str, ...]
    bits: tuple[int, ...]
    inference: InferenceWorkload
    finetune: FinetuneWorkload
    mode: BudgetMode
    source: str
    notes: str = ""
    path: Path | None = None

    def __post_init__(self) -> None:
        """Check every field and their consistency, raising ProfileError with the fix."""
        where = _where(self.path, self.name if isinstance(self.name, str) else None)
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ProfileError(
                f"{where}: `name` = {self.name!r} must be kebab-case (lowercase letters, digits "
                "and single dashes), e.g. `jetson-orin-nano-8gb`."
            )
        if self.path is not None and self.path.stem != self.name:
            raise ProfileError(
                f"{where}: `name` = {self.name!r} must equal the file name stem "
                f"{self.path.stem!r}; rename the file to `{self.name}.toml` or set "
                f'`name = "{self.path.stem}"`.'
            )
        for key in ("display_name", "source", "notes"):
            if not isinstance(getattr(self, key), str):
                raise ProfileError(
                    f"{where}: `{key}` = {getattr(self, key)!r} must be a string (in quotes)."
                )
        for key, fix in (
            ("display_name", 'name the device, e.g. "NVIDIA Jetson Orin Nano 8GB"'),
            ("source", "give the datasheet or URL that publishes the memory figure"),
        ):
            if not getattr(self, key).strip():
                raise ProfileError(f"{where}: `{key}` is empty; {fix}.")
        for key in ("memory_gib", "os_reserved_gib", "runtime_reserve_mib"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ProfileError(f"{where}: `{key}` = {value!r} must be a number.")
        if not isinstance(self.unified_memory, bool):
            raise ProfileError(
                f"{where}: `unified_memory` = {self.unified_memory!r} must be true or false."
            )
        if self.memory_gib <= 0:
            raise ProfileError(
                f"{where}: `memory_gib` = {self.memory_gib!r} must be > 0; use the device's "
                "published memory in GiB."
            )
        if self.os_reserved_gib < 0:
            raise ProfileError(
                f"{where}: `os_reserved_gib` = {self.os_reserved_gib!r} must be >= 0."
            )
        if self.os_reserved_gib >= self.memory_gib:
            raise ProfileError(
                f"{where}: `os_reserved_gib` = {self.os_reserved_gib!r} leaves nothing of "
                f"`memory_gib` = {self.memory_gib!r}; it must be smaller than the memory."
            )
        if self.runtime_reserve_mib < 0:
            raise ProfileError(
                f"{where}: `runtime_reserve_mib` = {self.runtime_reserve_mib!r} must be >= 0."
            )
        if self.budget_bytes <= self.reserve_bytes:
            raise ProfileError(
                f"{where}: `runtime_reserve_mib` = {self.runtime_reserve_mib!r} fills the whole "
                f"budget of {self.budget_bytes / _MIB:.0f} MiB (memory_gib - os_reserved_gib); "
                "lower the reserve or the OS share."
            )
        cc = _parse_cc(self.compute_capability, where)
        self._check_kernels(cc, where)
        if not isinstance(self.inference, InferenceWorkload):
            raise ProfileError(f"{where}: `inference` must be an InferenceWorkload table.")
        if not isinstance(self.finetune, FinetuneWorkload):
            raise ProfileError(f"{where}: `finetune` must be a FinetuneWorkload table.")
        if not isinstance(self.mode, BudgetMode):
            raise ProfileError(
                f"{where}: `mode` = {self.mode!r} must be one of {[m.value for m in BudgetMode]}."
            )

    def _check_kernels(self, cc: tuple[int, int], where: str) -> None:
        """Kernels must exist and run at this compute capability; bits need one such kernel."""
        if not isinstance(self.kernels, tuple) or not self.kernels:
            raise ProfileError(
                f"{where}: `kernels` = {list(self.kernels)!r} must be a non-empty list from "
                f"{sorted(KERNELS)}."
            )
        for kernel in self.kernels:
            spec = KERNELS.get(kernel) if isinstance(kernel, str) else None
            if spec is None:
                raise ProfileError(
                    f"{where}: `kernels` entry {kernel!r} is not a known GPTQModel kernel; use "
                    f"one of {sorted(KERNELS)}.{_closest(str(kernel), sorted(KERNELS))}"
                )
            if cc < spec.min_cc or (spec.max_cc is not None and cc > spec.max_cc):
                if spec.max_cc == spec.min_cc:
                    span = f"exactly {_cc_str(spec.min_cc)}"
                elif spec.max_cc is not None:
                    span = f"{_cc_str(spec.min_cc)} to {_cc_str(spec.max_cc)}"
                else:
                    span = f"{_cc_str(spec.min_cc)} or newer"
                raise ProfileError(
                    f"{where}: `kernels` entry {kernel!r} needs compute capability {span}, but "
                    f"`compute_capability` = {self.compute_capability!r}; remove {kernel!r}."
                )
        if len(set(self.kernels)) != len(self.kernels):
            raise ProfileError(f"{where}: `kernels` = {list(self.kernels)!r} lists a kernel twice.")
        if (
            not isinstance(self.bits, tuple)
            or not self.bits
            or any(isinstance(b, bool) or not isinstance(b, int) for b in self.bits)
        ):
            raise ProfileError(
                f"{where}: `bits` = {list(self.bits)!r} must be a non-empty list of integers from "
                f"{sorted(_SEARCH_BITS)}."
            )
        if list(self.bits) != sorted(set(self.bits)):
            raise ProfileError(
                f"{where}: `bits` = {list(self.bits)!r} must be sorted without repeats: "
                f"{sorted(set(self.bits))!r}."
            )
        bad = [b for b in self.bits if b not in _SEARCH_BITS]
        if bad:
            raise ProfileError(
                f"{where}: `bits` = {list(self.bits)!r} has {bad!r}; edgeqra searches only "
                f"{sorted(_SEARCH_BITS)}."
            )
        runnable = set().union(*(KERNELS[k].bits for k in self.kernels))
        missing = [b for b in self.bits if b not in runnable]
        if missing:
            helpers = sorted(k for k, s in KERNELS.items() if set(missing) <= s.bits)
            raise ProfileError(
                f"{where}: `bits` = {list(self.bits)!r} includes {missing!r}, which none of "
                f"`kernels` = {list(self.kernels)!r} runs; add a kernel that does "
                f"({', '.join(helpers) or 'none'}) or drop those bits."
            )

    @property
    def budget_bytes(self) -> int:
        """Bytes edgeqra's process may use: memory minus the OS share; M(C) must fit in it."""
        return round((self.memory_gib - self.os_reserved_gib) * _GIB)

    @property
    def reserve_bytes(self) -> int:
        """CUDA context + allocator slack + workspace, counted inside M(C)."""
        return round(self.runtime_reserve_mib * _MIB)

    @property
    def compute_capability_tuple(self) -> tuple[int, int]:
        """(major, minor) for comparisons against kernel floors."""
        return _parse_cc(self.compute_capability, _where(self.path, self.name))


def _parse_cc(value: Any, where: str) -> tuple[int, int]:
    """'8.7' -> (8, 7); anything else is a ProfileError that shows the expected form."""
    match = _CC_RE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ProfileError(
            f'{where}: `compute_capability` = {value!r} must be a string like "8.7" '
            "(major.minor, as `nvidia-smi --query-gpu=compute_cap --format=csv` prints it)."
        )
    return int(match.group(1)), int(match.group(2))


def _cc_str(cc: tuple[int, int]) -> str:
    """(8, 0) -> '8.0' for messages."""
    return f"{cc[0]}.{cc[1]}"


# TOML schema: key -> (accepted Python types, required). Tables are checked separately.
_TOP_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": ((str,), True),
    "display_name": ((str,), True),
    "memory_gib": ((int, float), True),
    "unified_memory": ((bool,), True),
    "os_reserved_gib": ((int, float), True),
    "runtime_reserve_mib": ((int, float), True),
    "compute_capability": ((str,), True),
    "kernels": ((list,), True),
    "bits": ((list,), True),
    "inference": ((dict,), True),
    "finetune": ((dict,), True),
    "mode": ((str,), True),
    "source": ((str,), True),
    "notes": ((str,), False),
}
_TABLE_KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    "inference": {"batch": (int,), "context": (int,)},
    "finetune": {"micro_batch": (int,), "seq_len": (int,), "gradient_checkpointing": (bool,)},
}
_TYPE_WORDS = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}


def _check_keys(
    data: Mapping[str, Any],
    schema: Mapping[str, tuple[type, ...]],
    required: Sequence[str],
    prefix: str,
    path: Path | None,
) -> None:
    """Unknown, missing and wrongly typed keys, each with the fix; bool never counts as a number."""
    where = _where(path, data.get("name") if isinstance(data.get("name"), str) else None)
    for key in data:
        if key not in schema:
            raise ProfileError(
                f"{where}: unknown key `{prefix}{key}`; allowed keys are "
                f"{sorted(schema)}.{_closest(key, sorted(schema))}"
            )
    for key in required:
        if key not in data:
            raise ProfileError(f"{where}: missing required key `{prefix}{key}`; add it.")
    for key, value in data.items():
        types = schema[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            want = "a number" if float in types else _TYPE_WORDS[types[0]]
            raise ProfileError(
                f"{where}: `{prefix}{key}` = {value!r} has the wrong type "
                f"({type(value).__name__}); it must be {want}."
            )


def parse_profile(data: dict, path: Path | None = None) -> DeviceProfile:
    """Build a validated DeviceProfile from parsed TOML, naming the file and key on any error."""
    if not isinstance(data, Mapping):
        raise ProfileError(f"{_where(path)}: expected a TOML table, got {type(data).__name__}.")
    where = _where(path, data.get("name") if isinstance(data.get("name"), str) else None)
    schema = {k: t for k, (t, _) in _TOP_KEYS.items()}
    _check_keys(data, schema, [k for k, (_, req) in _TOP_KEYS.items() if req], "", path)
    tables = {}
    for table, table_schema in _TABLE_KEYS.items():
        _check_keys(data[table], table_schema, list(table_schema), f"{table}.", path)
        for key, value in data[table].items():
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
                raise ProfileError(
                    f"{where}: `{table}.{key}` = {value!r} must be a positive integer; "
                    f"set e.g. `{key} = 1`."
                )
        tables[table] = data[table]
    mode = data["mode"]
    try:
        budget_mode = BudgetMode(mode)
    except ValueError:
        choices = [m.value for m in BudgetMode]
        raise ProfileError(
            f"{where}: `mode` = {mode!r} is not one of {choices}.{_closest(mode, choices)}"
        ) from None
    for key in ("kernels", "bits"):
        want = str if key == "kernels" else int
        for item in data[key]:
            if isinstance(item, bool) or not isinstance(item, want):
                raise ProfileError(
                    f"{where}: `{key}` entry {item!r} must be {_TYPE_WORDS[want]}; "
                    f"e.g. {key} = {['marlin', 'torch'] if key == 'kernels' else [2, 3, 4, 8]}."
                )
    bits = data["bits"]
    if len(set(bits)) != len(bits):
        raise ProfileError(f"{where}: `bits` = {bits!r} lists a bit-width twice.")
    return DeviceProfile(
        name=data["name"],
        display_name=data["display_name"],
        memory_gib=float(data["memory_gib"]),
        unified_memory=data["unified_memory"],
        os_reserved_gib=float(data["os_reserved_gib"]),
        runtime_reserve_mib=float(data["runtime_reserve_mib"]),
        compute_capability=data["compute_capability"],
        kernels=tuple(data["kernels"]),
        bits=tuple(sorted(bits)),
        inference=InferenceWorkload(**tables["inference"]),
        finetune=FinetuneWorkload(**tables["finetune"]),
        mode=budget_mode,
        source=data["source"],
        notes=data.get("notes", ""),
        path=path,
    )


def _read_profile(path: Path) -> DeviceProfile:
    """Parse one TOML file; syntax errors keep tomllib's line and column."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ProfileError(f"{_where(path)}: file not found; check the path.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{_where(path)}: TOML syntax error: {exc}; fix that line.") from None
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{_where(path)}: not UTF-8 text ({exc}); save it as UTF-8.") from None
    except OSError as exc:
        raise ProfileError(f"{_where(path)}: cannot read ({exc.strerror}).") from None
    return parse_profile(data, path)


def _builtin_dir() -> Path:
    """The folder of TOML files shipped as package `edgeqra.builtin_profiles`."""
    return Path(str(resources.files(_BUILTIN_PACKAGE)))


def _user_dir() -> Path:
    """Per-user profile folder (e.g. ~/.config/edgeqra/profiles); a function so tests can move it."""
    return Path(platformdirs.user_config_dir("edgeqra")) / "profiles"


def profile_dirs(extra: Sequence[Path | str] = ()) -> list[Path]:
    """Folders searched for profiles, lowest priority first: builtin, env, user, extra.

    Missing folders named in ``$EDGEQRA_PROFILES`` or ``extra`` raise (they are typos); a
    missing user folder is skipped.
    """
    dirs = [_builtin_dir()]
    for entry in os.environ.get(_ENV_VAR, "").split(os.pathsep):
        if entry.strip():
            folder = Path(entry).expanduser()
            if not folder.is_dir():
                raise ProfileError(
                    f"${_ENV_VAR} names {str(folder)!r}, which is not a folder; fix or unset it."
                )
            dirs.append(folder)
    user = _user_dir()
    if user.is_dir():
        dirs.append(user)
    for entry in extra:
        folder = Path(entry).expanduser()
        if not folder.is_dir():
            raise ProfileError(
                f"profile folder {str(folder)!r} does not exist; pass an existing folder."
            )
        dirs.append(folder)
    return dirs


def _index(extra_dirs: Sequence[Path | str]) -> dict[str, Path]:
    """Profile name -> winning file; a later folder overrides an earlier one by name."""
    found: dict[str, Path] = {}
    for folder in profile_dirs(extra_dirs):
        for path in sorted(folder.glob("*.toml")):
            found[path.stem] = path
    return found


def list_profiles(extra_dirs: Sequence[Path | str] = ()) -> list[DeviceProfile]:
    """Every visible profile (overrides applied), smallest memory first, then by name."""
    profiles = [_read_profile(path) for path in _index(extra_dirs).values()]
    return sorted(profiles, key=lambda p: (p.memory_gib, p.name))


def load_profile(name_or_path: str | Path, extra_dirs: Sequence[Path | str] = ()) -> DeviceProfile:
    """A profile by name (searched in profile_dirs) or by path to a .toml file."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or os.sep in text:
        return _read_profile(Path(name_or_path).expanduser())
    index = _index(extra_dirs)
    if text not in index:
        names = sorted(index)
        raise ProfileError(
            f"unknown device profile {text!r}.{_closest(text, names)} Available: "
            f"{', '.join(names)}. Or pass a path to a .toml file, or add one to "
            f"${_ENV_VAR} / {str(_user_dir())!r}."
        )
    return _read_profile(index[text])
