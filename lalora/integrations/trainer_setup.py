"""What ``LaLoRATrainerMixin`` decides once: the launcher it runs under, how the Trainer scales the loss,
and whether a precision fitted before the Trainer existed still fits the model after the Trainer's own
set-up (TRL aligns the config's special-token ids with the tokenizer)."""
from __future__ import annotations

from .. import validation
from ..adapters import base_model_of
from ..precision import Precision
from ..sharding import FSDP1_REFUSAL
from ..validation import config_hash

#: config fields a trainer may rewrite without changing the model's function: TRL sets the pad/eos/bos ids
#: of the tokenizer (``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``); generation uses them, the forward does not
TOKEN_ID_FIELDS = frozenset({"pad_token_id", "eos_token_id", "bos_token_id"})


def config_snapshot(model) -> tuple[str | None, dict | None]:
    """(config hash, config dict) of ``model``'s base model, or (None, None) without a config."""
    cfg = getattr(base_model_of(model), "config", None) if model is not None else None
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None, None
    return config_hash(model), cfg.to_dict()


def accept_trainer_config_changes(precision: Precision, before: tuple[str | None, dict | None], model) -> Precision:
    """``precision`` as it is, or -- when it was fitted on ``model`` before the trainer was built and the trainer
    changed only ``TOKEN_ID_FIELDS`` of the config -- a copy whose recorded config hash is the current one
    (``metadata["config_hash_before_trainer"]`` keeps the fitted one)."""
    hash_before, dict_before = before
    fitted = precision.metadata.get("config_hash")
    hash_now, dict_now = config_snapshot(model)
    if not fitted or fitted != hash_before or hash_now == hash_before or dict_before is None or dict_now is None:
        return precision
    keys = set(dict_before) | set(dict_now)
    # fields the config hash leaves out (run-time settings such as use_cache, which TRL switches off)
    ignored = set(getattr(validation, "_VOLATILE_CONFIG_KEYS", ()))
    changed = {k for k in keys if dict_before.get(k) != dict_now.get(k)} - ignored
    if not changed or not changed <= TOKEN_ID_FIELDS:
        return precision
    accepted = precision.to()
    accepted.metadata["config_hash_before_trainer"] = fitted
    accepted.metadata["config_hash"] = hash_now
    return accepted


def align_special_tokens(trainer) -> None:
    """What ``Trainer.train`` does first (transformers >= 5): copy the tokenizer's pad/eos/bos ids into the model's
    config. Done before the ``source_data=`` fit, so the fitted precision records the config the model trains
    with (the call is idempotent; older transformers do not align and have no such function)."""
    try:
        from transformers import PreTrainedTokenizerBase, ProcessorMixin
        from transformers.trainer_utils import align_special_tokens as align
    except ImportError:
        return
    processing = getattr(trainer, "processing_class", None)
    if isinstance(processing, (PreTrainedTokenizerBase, ProcessorMixin)) and hasattr(trainer.model, "config"):
        align(trainer.model, processing)


def launcher_of(trainer) -> str:
    """``"deepspeed"``, ``"fsdp2"`` or ``"plain"`` (one process, DDP); FSDP1 is refused."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "deepspeed"
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        if int(getattr(plugin, "fsdp_version", 1)) != 2:
            raise NotImplementedError(f"{type(trainer).__name__}: {FSDP1_REFUSAL}")
        return "fsdp2"
    return "plain"


def loss_divisor(trainer, num_items_in_batch) -> int:
    """What ``Trainer.training_step`` divides ``compute_loss``'s result by before its backward: the accumulation
    steps unless the loss is already scaled for accumulation (``loss_is_scaled_for_ga``, transformers >= 5.19;
    else a model that accepts loss kwargs with ``num_items_in_batch``, or a ``compute_loss_func``)."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = ((bool(getattr(trainer, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None)
                  or getattr(trainer, "compute_loss_func", None) is not None)
    if scaled:
        return 1
    return int(getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps))
