"""Which value wins when both the configuration and a checkpoint give a model option (``--ckpt_path``).

The rule, enforced by :class:`~lightning_ar.cli.LightningARCLI` before anything is instantiated:

- **architecture** options (a class's ``ARCHITECTURE``: widths, depths, patch size, ...) come from the checkpoint; a
  config file or command line that gives another value is an error naming the option and both values;
- every **other** option (sampling, evaluation, training: ``num_iter``, ``cfg``, ``temperature``, ...) comes from the
  command line, then the config files, then the checkpoint (a value set in neither takes the checkpoint's);
- options **linked from the data** (latent shape, class count, latent scale) come from the data; the model compares
  them with the checkpoint when it loads its weights;
- a checkpoint written by another class than the configured model is refused, naming both.

(Lightning 2.6's own ``LightningCLI`` re-parses the checkpoint's hyper-parameters *over* the parsed configuration,
so without this the checkpoint silently wins over the command line.)
"""

from __future__ import annotations

from typing import Any

from lightning_ar.checkpoints.loading import CheckpointError, resolve_class

LINKED = ("latent_shape", "num_classes", "latent_scale")


def init_options(model_class: type) -> set[str]:
    """The ``__init__`` options of ``model_class`` as the CLI sees them (jsonargparse's own reading of the signature,
    which follows ``**kwargs`` into the bases and into the classes they build, e.g. ``SamplingOptions``)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(model_class, "model", fail_untyped=False)
    return set(vars(parser.get_defaults().model))


def architecture_options(model_class: type) -> tuple[str, ...]:
    """The options of ``model_class`` that define its network (its ``ARCHITECTURE`` attribute; none if absent)."""
    return tuple(getattr(model_class, "ARCHITECTURE", ()))


def check_checkpoint_class(saved_class: str | None, configured: str | None, ckpt_path: str) -> str:
    """The class path to build: the configured one, which must be the checkpoint's class when that is recorded.

    Raises:
        CheckpointError: the checkpoint was written by another class, or no class is known at all.
    """
    if configured is None:
        if saved_class is None:
            raise CheckpointError(f"--ckpt_path {ckpt_path} records no model class; give the model's config "
                                  "(--config ...) or --model CLASS")
        return saved_class
    if saved_class is not None and resolve_class(saved_class) is not resolve_class(configured):
        raise CheckpointError(
            f"--ckpt_path {ckpt_path} holds a {saved_class} but the configured model is {configured}; use the config "
            f"of the model that wrote the checkpoint"
        )
    return configured


def checkpoint_overrides(
    saved: dict[str, Any], explicit: dict[str, Any], known: set[str], architecture: tuple[str, ...], ckpt_path: str
) -> tuple[dict[str, Any], list[str]]:
    """The model options to take from a checkpoint, applying the precedence rule of this module.

    Args:
        saved: The checkpoint's ``hyper_parameters`` (private ``_...`` keys are skipped).
        explicit: Model options given explicitly by the config files or the command line.
        known: Option names of the model class (others in the checkpoint are reported, not applied).
        architecture: The class's architecture options.
        ckpt_path: The checkpoint, for messages.

    Returns:
        ``(overrides, ignored)``: options to set from the checkpoint, and checkpoint options this class lacks.

    Raises:
        CheckpointError: an explicit architecture option disagrees with the checkpoint (all such options named).
    """
    overrides, ignored, conflicts = {}, [], []
    for name, value in saved.items():
        if name.startswith("_") or name in LINKED:
            continue
        if name not in known:
            ignored.append(name)
        elif name not in explicit:
            overrides[name] = value
        elif name in architecture and not _same(explicit[name], value):
            conflicts.append(f"model.init_args.{name}: config {explicit[name]!r} vs checkpoint {value!r}")
    if conflicts:
        raise CheckpointError(
            f"--ckpt_path {ckpt_path} was saved by a model of another architecture than the config asks for: "
            + "; ".join(conflicts) + ". Architecture comes from the checkpoint: drop these options or use the config "
            "the checkpoint was trained with."
        )
    return overrides, ignored


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b
