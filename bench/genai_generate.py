"""Greedy generation with onnxruntime-genai on an edgeqra ONNX package (no edgeqra import).

Runs in a venv that holds only onnxruntime-genai (issue 21: the package must load there):

    python3 -m venv /tmp/genai-venv && /tmp/genai-venv/bin/pip install "onnxruntime-genai==0.18.*"
    /tmp/genai-venv/bin/python bench/genai_generate.py PACKAGE_DIR --ids 5,17,42 --new 64

Prints one JSON line: {"tokens": [new token ids], "seconds", "tokens_per_s", "og_version",
"prompt_logits": [the logits after the prompt, (vocab,)]}.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    """Load the package with og.Model, generate greedily from the given ids, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--ids", required=True, help="comma-separated prompt token ids")
    parser.add_argument("--new", type=int, default=64, help="tokens to generate")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: default)")
    args = parser.parse_args()
    import onnxruntime_genai as og

    config = og.Config(args.package)
    if args.threads:  # the decoder's session options, as genai_config.json would set them
        options = {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    prompt = [int(x) for x in args.ids.split(",")]
    params = og.GeneratorParams(model)
    params.set_search_options(
        max_length=len(prompt) + args.new, min_length=len(prompt) + args.new, do_sample=False
    )
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(prompt)
    first = [float(x) for x in generator.get_logits().reshape(-1)]  # (vocab,) after the prompt
    while not generator.is_done():
        generator.generate_next_token()
    seconds = time.perf_counter() - started
    tokens = list(generator.get_sequence(0))[len(prompt) :]
    print(json.dumps({"tokens": [int(t) for t in tokens], "seconds": seconds,
                      "tokens_per_s": len(tokens) / seconds, "og_version": og.__version__,
                      "prompt_logits": first}))  # fmt: skip


if __name__ == "__main__":
    main()
