"""Device profiles: the shipped files load, budgets add up, user folders override, bad files explain."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

from edgeqra import profiles
from edgeqra.errors import EdgeQRAError, ProfileError
from edgeqra.profiles import (
    KERNELS,
    BudgetMode,
    FinetuneWorkload,
    InferenceWorkload,
    list_profiles,
    load_profile,
    parse_profile,
    profile_dirs,
)

GIB = 2**30
MIB = 2**20

REQUIRED_BUILTINS = {
    "jetson-orin-nano-8gb",
    "jetson-orin-nx-16gb",
    "jetson-agx-orin-32gb",
    "jetson-agx-orin-64gb",
    "rtx-3060-12gb",
    "rtx-4070-12gb",
    "rtx-4090-24gb",
    "t4-16gb",
    "l4-24gb",
    "a10g-24gb",
    "a100-40gb",
    "a100-80gb",
    "h100-80gb",
}


def _profile_text(name: str = "my-board", memory: float = 8.0, os_share: float = 1.0) -> str:
    """A valid profile file; tests break one line of it at a time."""
    return f"""\
# test profile
name = "{name}"
display_name = "My Board"
memory_gib = {memory}
unified_memory = true
os_reserved_gib = {os_share}
runtime_reserve_mib = 512
compute_capability = "8.7"
kernels = ["marlin", "triton", "torch"]
bits = [2, 3, 4, 8]
mode = "inference"
source = "test"

[inference]
batch = 1
context = 2048

[finetune]
micro_batch = 1
seq_len = 512
gradient_checkpointing = true
"""


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the developer's own ~/.config and $EDGEQRA_PROFILES out of every test."""
    monkeypatch.delenv("EDGEQRA_PROFILES", raising=False)
    monkeypatch.setattr(profiles, "_user_dir", lambda: tmp_path / "no-user-config")


def _write(folder: Path, name: str, text: str) -> Path:
    """Write ``<folder>/<name>.toml`` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- built-in profiles -----------------------------------------------------------------------


def test_builtin_profiles_all_load_and_cover_the_required_devices() -> None:
    loaded = list_profiles()
    names = [p.name for p in loaded]
    assert len(loaded) >= 12
    assert REQUIRED_BUILTINS <= set(names)
    assert len(names) == len(set(names))
    # sorted by memory, then name
    assert [(p.memory_gib, p.name) for p in loaded] == sorted(
        (p.memory_gib, p.name) for p in loaded
    )
    builtin = profile_dirs()[0]
    for p in loaded:
        assert p.path == builtin / f"{p.name}.toml"
        assert p.source.strip() and p.display_name.strip()
        assert 0 < p.reserve_bytes < p.budget_bytes <= p.memory_gib * GIB
        assert p.bits == tuple(sorted(p.bits)) and set(p.bits) <= {2, 3, 4, 8}
        assert p.path.read_text().startswith("#"), f"{p.name}.toml must open with a source comment"


def test_builtin_dir_is_the_packaged_resource_folder() -> None:
    builtin = profile_dirs()[0]
    assert builtin.is_dir()
    assert len(list(builtin.glob("*.toml"))) >= 12


@pytest.mark.parametrize(
    ("name", "memory", "unified", "cc"),
    [
        ("jetson-orin-nano-8gb", 8.0, True, "8.7"),
        ("jetson-agx-orin-64gb", 64.0, True, "8.7"),
        ("rtx-4090-24gb", 24.0, False, "8.9"),
        ("t4-16gb", 16.0, False, "7.5"),
        ("a100-40gb", 40.0, False, "8.0"),
        ("h100-80gb", 80.0, False, "9.0"),
    ],
)
def test_builtin_published_figures(name: str, memory: float, unified: bool, cc: str) -> None:
    p = load_profile(name)
    assert (p.memory_gib, p.unified_memory, p.compute_capability) == (memory, unified, cc)


def test_jetson_shares_memory_with_the_os_and_is_sized_for_the_edge() -> None:
    nano = load_profile("jetson-orin-nano-8gb")
    assert nano.unified_memory
    assert 1.5 <= nano.os_reserved_gib <= 2.5
    assert nano.inference == InferenceWorkload(batch=1, context=2048)
    assert nano.finetune == FinetuneWorkload(
        micro_batch=1, seq_len=512, gradient_checkpointing=True
    )


def test_builtin_kernels_respect_compute_capability_floors() -> None:
    for p in list_profiles():
        cc = p.compute_capability_tuple
        for kernel in p.kernels:
            assert cc >= KERNELS[kernel].min_cc, (p.name, kernel)
    assert "machete" in load_profile("h100-80gb").kernels
    assert "machete" not in load_profile("a100-80gb").kernels


# --- budget arithmetic -----------------------------------------------------------------------


def test_budget_and_reserve_bytes() -> None:
    p = parse_profile(tomllib.loads(_profile_text(memory=8.0, os_share=1.5)))
    assert p.budget_bytes == int(6.5 * GIB) == 6_979_321_856
    assert p.reserve_bytes == 512 * MIB
    nano = load_profile("jetson-orin-nano-8gb")
    expected = round((nano.memory_gib - nano.os_reserved_gib) * GIB)
    assert nano.budget_bytes == expected
    assert nano.reserve_bytes == round(nano.runtime_reserve_mib * MIB)


def test_profile_is_frozen_and_parse_normalises() -> None:
    text = _profile_text().replace("bits = [2, 3, 4, 8]", "bits = [8, 2, 4]")
    p = parse_profile(tomllib.loads(text))
    assert p.bits == (2, 4, 8)
    assert p.kernels == ("marlin", "triton", "torch")
    assert p.mode is BudgetMode.INFERENCE and p.mode == "inference"
    assert isinstance(p.memory_gib, float)
    assert p.notes == "" and p.path is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.memory_gib = 1.0  # type: ignore[misc]


def test_direct_construction_is_validated_too() -> None:
    good = parse_profile(tomllib.loads(_profile_text()))
    with pytest.raises(ProfileError, match=r"`os_reserved_gib`"):
        dataclasses.replace(good, os_reserved_gib=8.0)
    with pytest.raises(ProfileError, match=r"`kernels` entry 'machete'"):
        dataclasses.replace(good, kernels=("machete", "torch"))
    with pytest.raises(ProfileError, match=r"`inference.batch`"):
        InferenceWorkload(batch=0, context=2048)


# --- user folders ----------------------------------------------------------------------------


def test_extra_dir_adds_and_overrides(tmp_path: Path) -> None:
    user = tmp_path / "mine"
    _write(user, "my-board", _profile_text())
    _write(user, "jetson-orin-nano-8gb", _profile_text("jetson-orin-nano-8gb", os_share=0.75))
    builtin_count = len(list_profiles())

    mine = load_profile("my-board", extra_dirs=[user])
    assert mine.path == user / "my-board.toml"
    assert mine.budget_bytes == 7 * GIB

    nano = load_profile("jetson-orin-nano-8gb", extra_dirs=[str(user)])
    assert nano.os_reserved_gib == 0.75 and nano.path == user / "jetson-orin-nano-8gb.toml"
    assert load_profile("jetson-orin-nano-8gb").os_reserved_gib != 0.75  # builtin untouched

    listed = list_profiles(extra_dirs=[user])
    assert len(listed) == builtin_count + 1
    by_name = {p.name: p for p in listed}
    assert by_name["jetson-orin-nano-8gb"].os_reserved_gib == 0.75
    assert profile_dirs([user])[-1] == user


def test_env_var_dirs_add_and_later_ones_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    _write(first, "my-board", _profile_text(os_share=1.0))
    _write(second, "my-board", _profile_text(os_share=2.0))
    monkeypatch.setenv("EDGEQRA_PROFILES", f"{first}{profiles.os.pathsep}{second}")
    assert profile_dirs()[1:] == [first, second]
    assert load_profile("my-board").os_reserved_gib == 2.0
    # extra_dirs come after the env var, so they override it
    third = tmp_path / "c"
    _write(third, "my-board", _profile_text(os_share=3.0))
    assert load_profile("my-board", extra_dirs=[third]).os_reserved_gib == 3.0


def test_user_config_dir_sits_between_env_and_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_dir, user_dir, extra_dir = tmp_path / "env", tmp_path / "user", tmp_path / "extra"
    _write(env_dir, "my-board", _profile_text(os_share=1.0))
    _write(user_dir, "my-board", _profile_text(os_share=2.0))
    monkeypatch.setenv("EDGEQRA_PROFILES", str(env_dir))
    monkeypatch.setattr(profiles, "_user_dir", lambda: user_dir)
    assert load_profile("my-board").os_reserved_gib == 2.0
    _write(extra_dir, "my-board", _profile_text(os_share=3.0))
    assert profile_dirs([extra_dir])[1:] == [env_dir, user_dir, extra_dir]
    assert load_profile("my-board", extra_dirs=[extra_dir]).os_reserved_gib == 3.0


def test_missing_folders_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        profile_dirs([tmp_path / "nope"])
    monkeypatch.setenv("EDGEQRA_PROFILES", str(tmp_path / "typo"))
    with pytest.raises(ProfileError, match=r"\$EDGEQRA_PROFILES .*typo"):
        list_profiles()


def test_load_by_path(tmp_path: Path) -> None:
    path = _write(tmp_path, "my-board", _profile_text())
    assert load_profile(path).name == "my-board"
    assert load_profile(str(path)).path == path
    with pytest.raises(ProfileError, match="file not found"):
        load_profile(tmp_path / "gone.toml")


def test_unknown_name_lists_available_and_suggests() -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("jetson-orin-nano-8g")
    message = str(info.value)
    assert "'jetson-orin-nano-8g'" in message
    assert "Did you mean `jetson-orin-nano-8gb`?" in message
    for name in REQUIRED_BUILTINS:
        assert name in message
    assert isinstance(info.value, EdgeQRAError)


# --- bad files -------------------------------------------------------------------------------

_BASE = _profile_text()

BAD_FILES = [
    # (id, edited text, key expected in backticks, extra fragment expected in the message)
    ("unknown-key", _BASE.replace("memory_gib =", "memory_gb ="), "memory_gb", "memory_gib"),
    ("unknown-table-key", _BASE.replace("context =", "ctx ="), "inference.ctx", "allowed"),
    ("missing-key", _BASE.replace('source = "test"\n', ""), "source", "missing"),
    ("missing-table", _BASE.split("[finetune]")[0], "finetune", "missing"),
    ("missing-table-key", _BASE.replace("seq_len = 512\n", ""), "finetune.seq_len", "missing"),
    ("wrong-type-str", _BASE.replace("memory_gib = 8.0", 'memory_gib = "8"'), "memory_gib", "'8'"),
    (
        "wrong-type-bool",
        _BASE.replace("memory_gib = 8.0", "memory_gib = true"),
        "memory_gib",
        "True",
    ),
    ("wrong-type-cc", _BASE.replace('"8.7"', "8.7"), "compute_capability", "8.7"),
    (
        "wrong-type-unified",
        _BASE.replace("unified_memory = true", "unified_memory = 1"),
        "unified_memory",
        "true or false",
    ),
    ("wrong-type-batch", _BASE.replace("batch = 1", "batch = 1.5"), "inference.batch", "1.5"),
    (
        "wrong-type-gc",
        _BASE.replace("gradient_checkpointing = true", "gradient_checkpointing = 1"),
        "finetune.gradient_checkpointing",
        "true or false",
    ),
    ("memory-zero", _BASE.replace("memory_gib = 8.0", "memory_gib = 0"), "memory_gib", "> 0"),
    (
        "memory-negative",
        _BASE.replace("memory_gib = 8.0", "memory_gib = -4.0"),
        "memory_gib",
        "-4.0",
    ),
    (
        "os-negative",
        _BASE.replace("os_reserved_gib = 1.0", "os_reserved_gib = -1.0"),
        "os_reserved_gib",
        "-1.0",
    ),
    (
        "os-eats-memory",
        _BASE.replace("os_reserved_gib = 1.0", "os_reserved_gib = 8.0"),
        "os_reserved_gib",
        "smaller",
    ),
    (
        "reserve-fills-budget",
        _BASE.replace("runtime_reserve_mib = 512", "runtime_reserve_mib = 7168"),
        "runtime_reserve_mib",
        "7168",
    ),
    ("bits-not-searchable", _BASE.replace("bits = [2, 3, 4, 8]", "bits = [4, 5]"), "bits", "[5]"),
    ("bits-repeated", _BASE.replace("bits = [2, 3, 4, 8]", "bits = [4, 4]"), "bits", "twice"),
    ("bits-empty", _BASE.replace("bits = [2, 3, 4, 8]", "bits = []"), "bits", "non-empty"),
    ("bits-wrong-item", _BASE.replace("bits = [2, 3, 4, 8]", 'bits = ["4"]'), "bits", "'4'"),
    (
        "bits-no-kernel",
        _BASE.replace('["marlin", "triton", "torch"]', '["marlin", "triton"]'),
        "bits",
        "[3]",
    ),
    ("unknown-kernel", _BASE.replace('"triton"', '"tritn"'), "kernels", "Did you mean `triton`?"),
    ("kernels-empty", _BASE.replace('["marlin", "triton", "torch"]', "[]"), "kernels", "non-empty"),
    ("kernel-too-new", _BASE.replace('"marlin"', '"machete"'), "kernels", "9.0"),
    ("kernel-too-old-gpu", _BASE.replace('"8.7"', '"7.0"'), "kernels", "7.5"),
    ("cc-malformed", _BASE.replace('"8.7"', '"sm87"'), "compute_capability", "sm87"),
    ("cc-three-parts", _BASE.replace('"8.7"', '"8.7.1"'), "compute_capability", "8.7.1"),
    ("batch-zero", _BASE.replace("batch = 1", "batch = 0"), "inference.batch", "positive"),
    (
        "context-negative",
        _BASE.replace("context = 2048", "context = -1"),
        "inference.context",
        "-1",
    ),
    ("seq-zero", _BASE.replace("seq_len = 512", "seq_len = 0"), "finetune.seq_len", "positive"),
    (
        "mode-unknown",
        _BASE.replace('mode = "inference"', 'mode = "inferenc"'),
        "mode",
        "Did you mean `inference`?",
    ),
    (
        "name-not-stem",
        _BASE.replace('name = "my-board"', 'name = "other-board"'),
        "name",
        "other-board",
    ),
    (
        "name-not-kebab",
        _BASE.replace('name = "my-board"', 'name = "My_Board"'),
        "name",
        "kebab-case",
    ),
    (
        "display-empty",
        _BASE.replace('display_name = "My Board"', 'display_name = ""'),
        "display_name",
        "empty",
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "fragment"), [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES]
)
def test_bad_file_names_file_and_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    # the file is named after the profile unless the test is about the name itself
    path = _write(tmp_path, "my-board", text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message
    assert f"`{key}`" in message
    assert fragment in message
    assert "\n" not in message.strip()


def test_toml_syntax_error_reports_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "my-board", _BASE.replace("batch = 1", "batch = = 1"))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    line = _BASE.splitlines().index("batch = 1") + 1
    assert str(path) in str(info.value)
    assert "TOML syntax error" in str(info.value)
    assert f"line {line}" in str(info.value)


def test_a_bad_user_file_stops_listing_with_its_name(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "broken",
        _BASE.replace('name = "my-board"', 'name = "broken"').replace(
            "memory_gib = 8.0", "memory_gib = 0"
        ),
    )
    with pytest.raises(ProfileError, match=r"broken\.toml.*`memory_gib`"):
        list_profiles(extra_dirs=[tmp_path])


def test_parse_without_path_names_the_profile() -> None:
    data = tomllib.loads(_BASE.replace("memory_gib = 8.0", "memory_gib = -1"))
    with pytest.raises(ProfileError, match=r"device profile 'my-board': `memory_gib`"):
        parse_profile(data)


def test_kernel_table_matches_gptqmodel_source() -> None:
    """The table quotes GPTQModel's SUPPORTS_BITS; catch a silent change when it is upgraded."""
    spec = importlib.util.find_spec("gptqmodel")
    if spec is None or spec.origin is None:
        pytest.skip("gptqmodel not installed")
    root = Path(spec.origin).parent
    qlinear = root / "nn_modules" / "qlinear"
    for kernel, filename in [
        ("marlin", "marlin.py"),
        ("machete", "machete.py"),
        ("exllama_v2", "exllamav2.py"),
        ("triton", "tritonv2.py"),
        ("torch", "torch.py"),
    ]:
        found = re.search(r"SUPPORTS_BITS\s*=\s*\[([\d,\s]+)\]", (qlinear / filename).read_text())
        assert found, filename
        upstream = {int(b) for b in found.group(1).split(",") if b.strip()}
        assert KERNELS[kernel].bits == upstream & {2, 3, 4, 8}, kernel
    marlin = (qlinear / "marlin.py").read_text()
    assert "_MARLIN_MIN_CAPABILITY = _MARLIN_SM75_CAPABILITY" in marlin
    assert KERNELS["marlin"].min_cc == (7, 5)
    machete = (root / "utils" / "machete.py").read_text()
    assert "_MACHETE_REQUIRED_COMPUTE_CAPABILITY = (9, 0)" in machete
    assert KERNELS["machete"].min_cc == KERNELS["machete"].max_cc == (9, 0)
