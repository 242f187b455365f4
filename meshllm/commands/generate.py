"""``meshllm generate``: run a prompt through a chain of segments in this one process."""

from __future__ import annotations

import os
import sys

import click

from meshllm.commands.common import generation_options, print_json, progress, store_from
from meshllm.errors import BadRanges
from meshllm.partitioners import PartitionRequest
from meshllm.plugins import PartitionerRegistry, get_plugin_manager


@click.command("generate")
@click.argument("prompt")
@click.option(
    "--model",
    "model_name",
    help="Imported model name (default: the only one, else the bundled SmolLM2).",
)
@click.option("--segments", type=click.IntRange(min=1), help="Cut into K segments.  [default: 3]")
@click.option("--ranges", "ranges_text", help="Explicit layer ranges, e.g. 0-10,10-20,20-30.")
@click.option("--monolithic", is_flag=True, help="Run the unsplit model.")
@click.option(
    "--partitioner",
    default="even",
    show_default=True,
    help="Partitioner plugin used with --segments.",
)
@generation_options
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=os.cpu_count() or 1,
    show_default="all cores",
    help="ONNX Runtime threads, one pool shared by all segments.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.pass_context
def generate_cmd(
    ctx: click.Context,
    prompt: str,
    model_name: str | None,
    segments: int | None,
    ranges_text: str | None,
    monolithic: bool,
    partitioner: str,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    raw: bool,
    threads: int,
    as_json: bool,
) -> None:
    """Generate an answer to PROMPT with the model cut into segments, all run locally.

    Greedy decoding unless --temperature is given. The answer streams to stdout.
    """
    # Imported here: the daemon and other commands should not pay for ONNX Runtime.
    from meshllm.model.chain import LocalChain
    from meshllm.model.generate import generate
    from meshllm.model.ranges import parse_ranges
    from meshllm.model.sampling import SamplingParams
    from meshllm.model.tokenizer import ChatTokenizer

    if sum(x is not None and x is not False for x in (segments, ranges_text, monolithic)) > 1:
        raise BadRanges("use only one of --segments, --ranges and --monolithic")
    model = store_from(ctx).get(model_name)
    arch = model.manifest.architecture
    if monolithic:
        ranges = None
    elif ranges_text:
        ranges = parse_ranges(ranges_text)
    else:
        parts = segments or 3
        if parts > arch.num_layers:
            raise BadRanges(f"cannot cut {arch.num_layers} layers into {parts} segments")
        registry = PartitionerRegistry(get_plugin_manager())
        request = PartitionRequest(
            num_layers=arch.num_layers,
            num_workers=parts,
            layer_weight_bytes=model.manifest.per_layer_weight_bytes,
        )
        ranges = registry.partition(partitioner, request)
    chain = LocalChain.load(model, ranges, threads=threads, report=progress)
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate(
        chain,
        arch,
        ChatTokenizer(model.path),
        prompt,
        raw=raw,
        max_tokens=max_tokens,
        sampling=sampling,
        on_text=None if as_json else show,
    )
    if as_json:
        print_json({"model": model.name, **result.to_dict()})
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    progress(
        f"[{len(result.token_ids)} tokens, prompt {result.prompt_tokens}, "
        f"ttft {result.ttft_s * 1000:.0f} ms, {result.decode_tokens_per_s:.1f} tok/s, "
        f"segments {','.join(result.segments)}]"
    )
