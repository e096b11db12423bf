"""What a package states about itself: ``manifest.json`` and the model card ``README.md``.

The manifest holds what the package is, where it came from, the scores before and after
merging, the parity probe and (added last) the sha256 of every file; the card says the same
for a reader, with how to load it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgeqra.exporters.files import sha256

from edgeqra.rundir import JOURNAL, RunDir
from edgeqra.space import FP16_BITS, Config

__all__ = ["CARD", "MANIFEST_VERSION", "build_manifest", "write_card", "written_bits"]

CARD = "README.md"
MANIFEST_VERSION = 1


def written_bits(qcfg: dict[str, Any], units: Any, config: Config) -> dict[str, int]:
    """Per-module bits the written quantize config resolves to; must equal the run's config."""
    from edgeqra.exporters.gptq import module_bits

    names = [lin.name for unit in units for lin in unit.linears]
    got = module_bits(qcfg, names)
    want = {lin.name: c.bits for unit, c in zip(units, config, strict=True) for lin in unit.linears}
    wrong = sorted(n for n in names if got[n] != want[n])
    if wrong:  # a bug in the writer, never the user's input
        raise RuntimeError(
            f"written quantize config disagrees with the run's config on {len(wrong)} modules, "
            f"e.g. {wrong[0]}: {got[wrong[0]]} vs {want[wrong[0]]}"
        )
    return got


def build_manifest(
    run: RunDir,
    fmt: str,
    prepared: Any,
    scores: dict[str, Any],
    parity: dict[str, Any],
    qcfg: dict[str, Any],
    per_module: dict[str, int],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Everything the package states about itself (``files`` is added last)."""
    import edgeqra
    from edgeqra.bank import model_digest

    journal = run.path / JOURNAL
    search = dict(run.summary.get("search", {}))
    front = search.pop("front", [])
    job = run.job
    units = [
        {"unit": u.index, "name": u.name, "bits": c.bits, "rank": c.rank, "params": u.params}
        for u, c in zip(prepared.loaded.units, run.config, strict=True)
    ]
    return {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "edgeqra_version": edgeqra.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_dir": str(run.path.resolve()),
        "model": {
            "source": job.eval.model,
            "sha256": model_digest(prepared.loaded.path),
            "architecture": type(prepared.loaded.model).__name__,
        },
        "task": job.eval.task,
        "profile": run.summary.get("profile"),
        "budget_bytes": run.chosen.get("budget_bytes"),
        "config": {
            "spec": str(run.config),
            "short": run.config.short(),
            "average_bits": run.chosen.get("average_bits"),
            "units": units,
        },
        "quantization": {
            "group_size": qcfg.get("group_size"),
            "sym": qcfg.get("sym"),
            "desc_act": qcfg.get("desc_act"),
            "checkpoint_format": qcfg.get("checkpoint_format"),
            "default_bits": qcfg.get("bits"),
            "dynamic": qcfg.get("dynamic"),
            "module_bits": per_module,
            "calibration_rows": list(prepared.calibration.shape),
        },
        "predicted_memory": run.chosen.get("predicted_memory"),
        "scores": scores,
        "search": {**search, "front_size": len(front)},
        "journal": {
            "sha256": sha256(journal) if journal.is_file() else None,
            "evaluations": len(journal.read_text().splitlines()) if journal.is_file() else 0,
        },
        "parity": parity,
        **extra,
    }


_LOADING = {
    "gptq": """```python
from edgeqra.gptq import load_quantized          # GPTQModel.load, float32 on CPU
from transformers import AutoTokenizer
model = load_quantized("{name}")                 # or gptqmodel.GPTQModel.load("{name}")
tok = AutoTokenizer.from_pretrained("{name}")
print(tok.decode(model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=20)[0]))
```""",
    "adapter": """```python
from edgeqra.gptq import load_quantized          # GPTQModel.load, float32 on CPU
from peft import PeftModel
from transformers import AutoTokenizer
model = PeftModel.from_pretrained(load_quantized("{name}/base"), "{name}/adapter")
tok = AutoTokenizer.from_pretrained("{name}/base")
```""",
    "onnx": """```python
import numpy as np
from edgeqra.exporters.onnx import greedy_generate  # onnxruntime on {name}/model.onnx, KV cache
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained("{name}")
print(tok.decode(greedy_generate("{name}", np.array(tok("Hello")["input_ids"]), 20)))
```

Or with onnxruntime-genai alone (`pip install onnxruntime-genai`; `genai_config.json` is here):

```python
import onnxruntime_genai as og
model = og.Model("{name}")
tok = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length=64, do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens(tok.encode("Hello"))
while not gen.is_done():
    gen.generate_next_token()
print(tok.decode(gen.get_sequence(0)))
```""",
}

_WHAT = {
    "gptq": "the tuned model with its LoRA adapters merged into the weights "
    "(W' = Dequant(Q(W)) + (alpha/r)·B·A per unit), rounded onto the GPTQ grid of each "
    "unit's bit-width (see the merge table below): one mixed-precision GPTQ checkpoint.",
    "adapter": "the exact form the search tuned: `base/` is the mixed-precision GPTQ "
    "checkpoint holding the very quantized values of the search's GPTQ bank, `adapter/` "
    "the PEFT LoRA adapter with one rank per unit (`rank_pattern`), not merged.",
    "onnx": "the merged model (as in the `gptq` format) as an ONNX graph whose linear layers "
    "are onnxruntime `MatMulNBits` nodes carrying the GPTQ values, each at its unit's width; "
    "units the merge kept unmerged add their LoRA branch (s·(x Aᵀ) Bᵀ, float32 MatMuls) "
    "beside it.",
}


def _fmt_score(entry: dict[str, Any] | None) -> str:
    return "—" if not entry else f"{entry['score']:.4f}"


def _merge_label(m: dict[str, Any]) -> str:
    """How the package's merge was done, in a few words."""
    method = ((m.get("merge") or {}).get("settings") or {}).get("method")
    return "on the bank's grid" if method == "grid" else "GPTQ again per unit"


def _merge_lines(m: dict[str, Any]) -> list[str]:
    """The model card's per-layer merge table (grid merge only)."""
    merge = m.get("merge") or {}
    if not merge.get("layers"):
        return []
    lines = [
        "",
        "## Merge, per layer",
        "",
        "W' = Dequant(Q(W)) + (alpha/r)·B·A rounded onto the bank's own scales and zero points "
        "with GPTQ error feedback. *lost*: the fraction of the adapter's effect on the layer's "
        "outputs that the rounding loses (0 = kept, 1 = as if dropped; round-to-nearest in "
        f"brackets); threshold {merge['settings']['threshold']}, above it: "
        f"`{merge['settings']['over_threshold']}`.",
        "",
        "| unit | bits → written | rank | action | lost (RTN) | codes changed |",
        "|---|---|---|---|---|---|",
    ]
    for layer in merge["layers"]:
        flag = " ⚠" if layer["flagged"] else ""
        lines.append(
            f"| {layer['unit']} | {layer['bits']} → {layer['bits_written']} | {layer['rank']} | "
            f"{layer['action']}{flag} | {layer['lost']:.3f} ({layer['lost_rtn']:.3f}) | "
            f"{100 * layer['codes_changed']:.2f}% |"
        )
    if merge.get("unmerged_modules") and m["format"] == "onnx":
        lora = (m.get("onnx") or {}).get("lora") or {}
        lines += ["", f"Units kept unmerged: their adapter is in the graph as float32 LoRA "
                      f"MatMuls ({len(merge['unmerged_modules'])} modules, "
                      f"{lora.get('bytes', 0) / 2**20:.1f} MiB) beside the MatMulNBits base."]  # fmt: skip
    elif merge.get("unmerged_modules"):
        lines += ["", "Units kept unmerged: their adapter is in `adapter/` and loads on top."]
    return lines


def write_card(root: Path, m: dict[str, Any]) -> None:
    """The package's README.md: what it is, how to load it, the per-layer config, the scores."""
    fmt, s = m["format"], m["scores"]
    name = "PACKAGE_DIR"
    lines = [
        f"# {m['model']['source']} — edgeqra `{fmt}` export",
        "",
        f"This package is {_WHAT[fmt]}",
        "",
        f"- searched for the `{m['profile']}` profile under a budget of "
        f"{(m['budget_bytes'] or 0) / 2**30:.3f} GiB (predicted: "
        f"{(m['predicted_memory'] or {}).get('total', 0) / 2**30:.3f} GiB)",
        f"- task `{m['task']}`, metric `{s['metric']}`; config `{m['config']['short']}` "
        f"({m['config']['average_bits']:.2f} average bits)",
        f"- edgeqra {m['edgeqra_version']}, model sha256 `{m['model']['sha256'][:16]}…`",
        "",
        "## Load it",
        "",
        _LOADING[fmt].format(name=name),
        "",
    ]
    if fmt in ("gptq", "adapter"):
        lines += [
            "Load it with GPTQModel (`GPTQModel.load`), not with transformers: transformers "
            "cannot load checkpoints with a per-module `dynamic` quantize config (shape "
            "mismatches) and mis-loads even uniform GPTQModel checkpoints (garbage logits), "
            "as measured in edgeqra's FINDINGS.md. GPTQModel picks a kernel per bit-width.",
            "",
        ]
    lines += [
        "Check the files and a short logit parity probe with `edgeqra verify PACKAGE_DIR`.",
        "",
        "## Scores (held-out split of the run)",
        "",
        "| measured | score |",
        "|---|---|",
        f"| the run's final score (search, float32) | {s['run_final']:.4f} |",
        f"| unmerged: bank GPTQ base + adapter, in memory | {_fmt_score(s['before_merge'])} |",
        f"| merged, {_merge_label(m)} (reloaded) | {_fmt_score(s['after_merge'])} |",
        f"| this package, reloaded with its loader | {_fmt_score(s['package'])} |",
        "",
        "## Per-layer config",
        "",
        "| unit | module prefix | bits | LoRA rank |",
        "|---|---|---|---|",
    ]
    for u in m["config"]["units"]:
        bits = "16 (dense)" if u["bits"] >= FP16_BITS else str(u["bits"])
        lines.append(f"| {u['unit']} | `{u['name']}` | {bits} | {u['rank']} |")
    lines += _merge_lines(m)
    lines += [
        "",
        f"GPTQ group size {m['quantization']['group_size']}, symmetric "
        f"{m['quantization']['sym']}, act-order {m['quantization']['desc_act']}; "
        f"{m['quantization']['calibration_rows'][0]} calibration rows of "
        f"{m['quantization']['calibration_rows'][1]} tokens. `manifest.json` lists every "
        "module's bits, the memory breakdown, the search summary and each file's sha256.",
        "",
    ]
    (root / CARD).write_text("\n".join(lines))
