"""``meshllm model import``, ``synth`` and ``list``."""

from __future__ import annotations

import click

from meshllm.commands.common import print_json, progress, store_from
from meshllm.model import PRECISIONS

precision_option = click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="int4",
    show_default=True,
    help="Weight precision of the ONNX export.",
)


@click.group("model")
def model_group() -> None:
    """Import and list models held by this peer."""


@model_group.command("import")
@click.argument("source", required=False, type=click.Path(path_type=str))
@precision_option
@click.option("--name", help="Name to store the model under (default: from the source).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def import_cmd(
    ctx: click.Context, source: str | None, precision: str, name: str | None, as_json: bool
) -> None:
    """Convert SOURCE (a GGUF file or Hugging Face directory) to ONNX under the peer's home.

    Without SOURCE, imports the bundled SmolLM2-135M-Instruct. Re-importing the same source at
    the same precision does nothing.
    """
    from meshllm.model.importer import import_model

    store = store_from(ctx)
    manifest, converted = import_model(
        store.dir, source, precision=precision, name=name, report=progress
    )
    if not converted:
        progress(f"{manifest.name} is already imported (same source and precision)")
    if as_json:
        print_json({"converted": converted, "manifest": _manifest_dict(manifest)})
    else:
        click.echo(f"{manifest.name}\t{store.dir / manifest.name}")


@model_group.command("synth")
@click.argument("shape", required=False)
@precision_option
@click.option("--name", help="Name to store the model under (default: SHAPE-synth-PRECISION).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights.")
@click.option("--layers", type=click.IntRange(1, 256), help="Fewer layers (for fast tests).")
@click.option("--hidden", type=click.IntRange(32, 65536), help="A narrower model (for tests).")
@click.option("--vocab", type=click.IntRange(259, 1 << 20), help="A smaller vocabulary.")
@click.option("--list", "list_shapes", is_flag=True, help="List the known shapes and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def synth_cmd(
    ctx: click.Context,
    shape: str | None,
    precision: str,
    name: str | None,
    seed: int,
    layers: int | None,
    hidden: int | None,
    vocab: int | None,
    list_shapes: bool,
    as_json: bool,
) -> None:
    """Build a model with a published checkpoint's exact SHAPE and seeded random weights.

    Memory, speed and the plan depend only on shapes, and the mesh's greedy tokens must equal
    the whole model's whatever the weights: a synthetic model shows what a mesh of phones can
    hold without downloading anything. It goes through the same builder and partitioner as
    `model import`, with a byte-level tokenizer of the model's vocabulary size. The same
    arguments give the same bytes (and a second run finds the model imported already).
    """
    from meshllm.model.synth import SHAPES, synth_model
    from meshllm.model.synth import shape as find_shape

    if list_shapes:
        rows = [
            {
                "name": s.name,
                "checkpoint": s.checkpoint,
                "family": s.model_type,
                "layers": s.layers,
                "hidden": s.hidden,
                "vocab": s.vocab,
            }
            for s in SHAPES.values()
        ]
        if as_json:
            print_json(rows)
            return
        click.echo(f"{'SHAPE':14} {'FAMILY':7} {'LAYERS':>6} {'HIDDEN':>6} {'VOCAB':>7}  FROM")
        for r in rows:
            click.echo(
                f"{r['name']:14} {r['family']:7} {r['layers']:>6} {r['hidden']:>6} "
                f"{r['vocab']:>7}  {r['checkpoint']}"
            )
        return
    if shape is None:
        raise click.UsageError("give a SHAPE (see `meshllm model synth --list`)")
    find_shape(shape)  # an unknown one fails here, listing the known ones
    store = store_from(ctx)
    manifest, built = synth_model(
        store.dir,
        shape,
        precision=precision,
        name=name,
        seed=seed,
        layers=layers,
        hidden=hidden,
        vocab=vocab,
        report=progress,
    )
    if not built:
        progress(f"{manifest.name} is already built (same shape, seed and precision)")
    if as_json:
        print_json({"converted": built, "manifest": _manifest_dict(manifest)})
    else:
        click.echo(f"{manifest.name}\t{store.dir / manifest.name}")


@model_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """List imported models."""
    models = store_from(ctx).list()
    if as_json:
        print_json([{"path": str(m.path), **_manifest_dict(m.manifest)} for m in models])
        return
    if not models:
        click.echo("no models imported; run `meshllm model import`")
        return
    click.echo(f"{'NAME':32} {'PREC':5} {'LAYERS':>6} {'WEIGHTS':>10}  SOURCE")
    for m in models:
        man = m.manifest
        mb = man.total_weight_bytes / 2**20
        # A synthetic model's source says which shape and seed, and that its weights are random.
        source = (
            f"{man.source} (synthetic, seed {man.synthetic.get('seed')}: random weights)"
            if man.synthetic
            else man.source
        )
        click.echo(
            f"{man.name:32} {man.precision:5} {man.architecture.num_layers:>6} "
            f"{mb:>8.1f}MB  {source}"
        )


def _manifest_dict(manifest) -> dict:  # type: ignore[no-untyped-def]
    import json

    return json.loads(manifest.to_json())
