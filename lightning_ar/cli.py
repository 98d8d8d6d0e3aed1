"""The ``lightning-ar`` command: LightningCLI with ``fit|validate|test|predict`` on YAML configs (omegaconf mode).

``data.latent_shape``, ``data.num_classes`` and ``data.latent_scale`` are linked into the model at instantiation, so
a config never types them twice. Every model of the collection accepts these three arguments.

With ``--ckpt_path FILE`` the checkpoint's hyper-parameters are merged by the rule of
:mod:`lightning_ar.checkpoints.precedence` (architecture from the checkpoint, everything else from the command line,
then the config, then the checkpoint). ``--ckpt_path last`` resumes from the newest last checkpoint whatever the logger
version, and is an error when there is none. Checkpoints are written atomically (:class:`AtomicCheckpointIO`).
"""

from __future__ import annotations

import importlib
import os
import sys
from argparse import RawDescriptionHelpFormatter
from collections.abc import Callable
from typing import Any

from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import OmegaConf

from lightning_ar.callbacks.nonfinite import NonFiniteLossError
from lightning_ar.checkpoints.atomic_io import AtomicCheckpointIO
from lightning_ar.checkpoints.loading import checkpoint_class, load_lightning_checkpoint, resolve_class
from lightning_ar.checkpoints.precedence import (
    LINKED,
    architecture_options,
    check_checkpoint_class,
    checkpoint_overrides,
    init_options,
)
from lightning_ar.checkpoints.resume import resume_last
from lightning_ar.config_check import check_config_files
from lightning_ar.data.datamodule import LatentDataModule
from lightning_ar.errors import UsageError

DESCRIPTION = ("lightning-ar: masked autoregressive generation with a per-token diffusion loss. The Trainer stages "
               "below read YAML configs (--config configs/digits/mar.yaml).")

# ``--ckpt_path`` values that are not files (Lightning resolves them; ``last`` is handled by :func:`resume_last`).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")

# Subcommands that are not Lightning Trainer stages: name -> ("module:function" taking the remaining arguments, help).
TOOLS: dict[str, tuple[str, str]] = {
    "cache": ("lightning_ar.data.cache:cache_main", "encode an ImageFolder with a VAE into a latent cache"),
    "import-mar": ("lightning_ar.checkpoints.import_mar:import_main", "convert an official MAR checkpoint"),
    "convert-vae": ("lightning_ar.checkpoints.convert_vae:convert_main", "convert MAR's KL-16 VAE to a diffusers dir"),
    "evaluate": ("lightning_ar.metrics.evaluate:evaluate_main", "FID/IS/precision/recall of an ADM .npz"),
    "demo": ("lightning_ar.demo:main", "train, evaluate and refine on the embedded digits (what `make demo` runs)"),
    "configs": ("lightning_ar.config_files:configs_main", "where the shipped configs are (also when installed)"),
}


def _register_resolvers() -> None:
    """omegaconf resolvers usable in configs: ``${mul:a,b}`` and ``${div:a,b}`` (e.g. lr scaled by batch size)."""
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver  # omegaconf 2.4 / 2.3
    for name, fn in (("mul", lambda a, b: a * b), ("div", lambda a, b: a / b)):
        if not OmegaConf.has_resolver(name):
            register(name, fn)


def _tools_help() -> str:
    lines = [f"  {name:<12} {summary}" for name, (_, summary) in TOOLS.items()]
    return "Tools (each with its own --help):\n" + "\n".join(lines)


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the description and the tools list kept as written."""


class LightningARCLI(LightningCLI):
    """LightningCLI that links data-derived values into the model and gives the command line precedence over a
    checkpoint's hyper-parameters (see the module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args`` (always given explicitly by :func:`main`, so Lightning's warning about ``args`` together
        with ``sys.argv`` does not apply) and remember which options were given explicitly."""
        if isinstance(args, (dict, Namespace)):
            self.config, self._explicit = parser.parse_object(args), parser.parse_object(args, defaults=False)
        else:
            self.config, self._explicit = parser.parse_args(args), parser.parse_args(args, defaults=False)

    def _parse_ckpt_path(self) -> None:
        """Replaces Lightning's step (which lets the checkpoint's hyper-parameters override the command line)."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or ckpt_path in SPECIAL_CKPT_PATHS:
            return
        ckpt = load_lightning_checkpoint(ckpt_path)
        model = self.config[sub].get("model")
        class_path = check_checkpoint_class(checkpoint_class(ckpt), model.class_path if model else None, ckpt_path)
        model_class = resolve_class(class_path)
        if model_class is None:
            raise UsageError(f"--ckpt_path {ckpt_path}: its model class {class_path} cannot be imported")
        known = init_options(model_class)
        overrides, ignored = checkpoint_overrides(
            ckpt.get("hyper_parameters") or {}, self._explicit_model_options(sub), known,
            architecture_options(model_class), ckpt_path,
        )
        if ignored:
            rank_zero_warn(f"--ckpt_path {ckpt_path}: hyper-parameters {ignored} are not options of {class_path}; "
                           "ignored")
        update = {"class_path": class_path, "init_args": overrides}
        self.config = self.parser.parse_object({sub: {"model": update}}, self.config)

    def _explicit_model_options(self, sub: str) -> dict[str, Any]:
        model = self._explicit.get(sub, Namespace()).get("model")
        init_args = model.get("init_args") if isinstance(model, Namespace) else None
        return dict(vars(init_args)) if isinstance(init_args, Namespace) else {}

    def instantiate_classes(self) -> None:
        """Lightning's step, with an option check's error (``model.<name> ...``, raised inside a constructor and
        wrapped by jsonargparse in its own) re-raised as the :class:`UsageError` it names: no chained traceback."""
        try:
            super().instantiate_classes()
        except UsageError:
            raise
        except (ValueError, TypeError) as err:
            named = named_option_error(err)
            if named is None:
                raise
            raise UsageError(named) from None

    def after_instantiate_classes(self) -> None:
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    def _resume(self) -> None:
        if self.config_init[self.subcommand].get("ckpt_path") == "last":
            resume_last(self.trainer)

    before_fit = before_validate = before_test = before_predict = _resume


OPTION_GROUPS = ("model.", "data.", "trainer.")


def named_option_error(err: BaseException) -> str | None:
    """The message of the first exception in ``err``'s chain (itself, then its causes) that names an option
    (``model.<name> ...``, ``data.<name> ...``); ``None`` when none does."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if str(current).startswith(OPTION_GROUPS):
            return str(current)
        current = current.__cause__ or current.__context__
    return None


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningARCLI:
    """Parse ``args`` (``sys.argv[1:]`` when ``None``), instantiate, and run the subcommand unless ``run=False``.

    Returns:
        The CLI object (``cli.trainer``, ``cli.model``, ``cli.datamodule``).
    """
    _register_resolvers()
    args = sys.argv[1:] if args is None else list(args)
    check_config_files(args)
    return LightningARCLI(
        model_class=None,
        datamodule_class=LatentDataModule,
        subclass_mode_model=True,
        parser_kwargs={"parser_mode": "omegaconf", "epilog": _tools_help(), "description": DESCRIPTION,
                       "formatter_class": _HelpFormatter, "prog": "lightning-ar"},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def _tool(name: str) -> Callable[[list[str]], None]:
    module, function = TOOLS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-ar``: ``fit|validate|test|predict`` (LightningCLI) and the tools of :data:`TOOLS`
    (``cache``, ``import-mar``, ``convert-vae``, ``evaluate``, ``demo``, ``configs``; each with its own ``--help``).

    A :class:`~lightning_ar.errors.UsageError` (a bad option, config or input file) is printed without a traceback
    and exits with status 2; a non-finite loss that stopped training (``NonFiniteLoss(policy="stop")``) exits 1.
    """
    argv = sys.argv[1:] if args is None else list(args)
    launch_env = {key: os.environ.get(key) for key in _LAUNCH_ENV}
    try:
        if argv and argv[0] in TOOLS:
            _tool(argv[0])(argv[1:])
        else:
            build_cli(argv)
    except UsageError as err:
        print(f"lightning-ar: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteLossError as err:
        print(f"lightning-ar: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        _destroy_process_group()
        _restore_env(launch_env)


# What a DDP stage writes into this process's environment (Lightning's launcher and cluster environment, and
# ``seed_everything``). Left behind, a later run in this process, or a subprocess it starts, takes ``LOCAL_RANK``
# for "launched externally" and never starts its other processes (a hang), or reuses a stale ``MASTER_PORT``.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE",
               "LOCAL_WORLD_SIZE", "GROUP_RANK", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def _restore_env(saved: dict[str, str | None]) -> None:
    """Put the launch variables of :data:`_LAUNCH_ENV` back as they were before :func:`main` ran."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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
