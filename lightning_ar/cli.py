"""The ``lightning-ar`` command: LightningCLI with ``fit|validate|test|predict`` on YAML configs (omegaconf mode).

``data.latent_shape``, ``data.num_classes`` and ``data.latent_scale`` are linked into the model at instantiation, so
a config never types them twice. Every model of the collection accepts these three arguments.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from lightning.pytorch.cli import LightningCLI
from omegaconf import OmegaConf

from lightning_ar.data.datamodule import LatentDataModule

LINKED = ("latent_shape", "num_classes", "latent_scale")


def _register_resolvers() -> None:
    """omegaconf resolvers usable in configs: ``${mul:a,b}`` and ``${div:a,b}`` (e.g. lr scaled by batch size)."""
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    for name, fn in (("mul", lambda a, b: a * b), ("div", lambda a, b: a / b)):
        if not OmegaConf.has_resolver(name):
            register(name, fn)


class LightningARCLI(LightningCLI):
    """LightningCLI that links data-derived values into the model."""

    def add_arguments_to_parser(self, parser) -> None:
        for name in LINKED:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningARCLI:
    """Parse ``args`` (``sys.argv[1:]`` when ``None``), instantiate, and run the subcommand unless ``run=False``.

    Returns:
        The CLI object (``cli.trainer``, ``cli.model``, ``cli.datamodule``).
    """
    _register_resolvers()
    return LightningARCLI(
        model_class=None,
        datamodule_class=LatentDataModule,
        subclass_mode_model=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


# Subcommands that are not Lightning Trainer stages: name -> "module:function" taking the remaining arguments.
TOOLS: dict[str, str] = {
    "cache": "lightning_ar.data.cache:cache_main",
    "import-mar": "lightning_ar.checkpoints.import_mar:import_main",
    "convert-vae": "lightning_ar.data.vae:convert_main",
    "evaluate": "lightning_ar.metrics.evaluate:evaluate_main",
    "demo": "lightning_ar.demo:main",
    "configs": "lightning_ar.config_files:configs_main",
}


def _tool(name: str) -> Callable[[list[str]], None]:
    module, function = TOOLS[name].split(":")
    return getattr(importlib.import_module(module), function)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-ar``: ``fit|validate|test|predict`` (LightningCLI) and the tools ``cache``,
    ``convert-vae``, ``import-mar`` and ``evaluate`` (each with its own ``--help``)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in TOOLS:
        _tool(argv[0])(argv[1:])
        return
    try:
        build_cli(argv)
    finally:
        _destroy_process_group()


def _destroy_process_group() -> None:
    """Tear down the default process group that a DDP run left (Lightning keeps it alive after the stage).

    Without this, gloo's worker threads can still hold work objects when the interpreter finalizes, and the
    process aborts with ``terminate called without an active exception`` (SIGABRT) after a successful run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
