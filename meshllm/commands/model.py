"""``meshllm model import`` and ``meshllm model list``."""

from __future__ import annotations

import click

from meshllm.commands.common import print_json, progress, store_from
from meshllm.model import PRECISIONS


@click.group("model")
def model_group() -> None:
    """Import and list models held by this peer."""


@model_group.command("import")
@click.argument("source", required=False, type=click.Path(path_type=str))
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="int4",
    show_default=True,
    help="Weight precision of the ONNX export.",
)
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
        click.echo(
            f"{man.name:32} {man.precision:5} {man.architecture.num_layers:>6} "
            f"{mb:>8.1f}MB  {man.source}"
        )


def _manifest_dict(manifest) -> dict:  # type: ignore[no-untyped-def]
    import json

    return json.loads(manifest.to_json())
