"""The config fields every training stage shares (model, LoRA, optimiser, batch sizes, schedule, run
directory), each with the values it takes, checked when the config is built."""
from dataclasses import MISSING, asdict, dataclass, fields

from rlhf_fast import distributed
from rlhf_fast.config import ConfigError, check_divides, check_fields, option


@dataclass
class TrainConfig:
    """Fields shared by every training stage."""

    model: str = option("", "local Hugging Face model directory to start from")
    output_dir: str = option("runs/out", "where checkpoints, metrics.jsonl and the plot go")
    overwrite: bool = option(False, "clear output_dir first when it holds an earlier run (else that is an error "
                                    "unless resume)")
    seed: int = option(0, "seed for torch, numpy and python's random")
    device: str = option("auto", "'auto' (cuda when present), 'cuda', 'cpu'")
    dtype: str = option("auto", "weights dtype: 'auto' (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32",
                        choices=("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"))
    attn_implementation: str = option("auto", "'auto' (flash_attention_2 if installed, else sdpa), or any HF name")
    trust_remote_code: bool = option(False, "allow model code from the model directory (off: safer)")
    gradient_checkpointing: bool = option(False, "keep only each decoder layer's input in the forward and recompute "
                                                 "the layer in the backward (activation memory ~1/17, one more "
                                                 "trunk forward per step)")
    fsdp: bool = option(False, "under torchrun: shard the decoder over the ranks with FSDP2 (with LoRA the frozen "
                               "base; with full fine-tuning every decoder weight, its gradient and optimiser "
                               "state); off: every rank holds the whole model (data parallel)")
    lora_r: int = option(16, "LoRA rank; 0 = full fine-tuning", min=0)
    lora_alpha: int = option(32, "LoRA alpha (scale = alpha / r)", above=0)
    lora_dropout: float = option(0.0, "LoRA dropout", min=0.0, below=1.0)
    lora_target_modules: str = option("all-linear", "'all-linear' or comma-separated module names")
    learning_rate: float = option(1e-4, "peak learning rate (AdamW)", min=0.0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    warmup_steps: int = option(0, "linear warm-up steps before the schedule", min=0)
    lr_schedule: str = option("cosine", "after warm-up: 'cosine' decay to 0, or 'constant'",
                              choices=("cosine", "constant"))
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)", min=0.0)
    batch_size: int = option(16, "examples per optimiser step", min=1)
    micro_batch_size: int = option(8, "examples per forward/backward (gradient accumulation = batch / micro)",
                                   min=1)
    max_length: int = option(512, "token budget of prompt + response", min=2)
    epochs: float = option(1.0, "passes over the training data", above=0.0)
    max_steps: int = option(0, "stop after this many optimiser steps (0 = from epochs)", min=0)
    log_every: int = option(1, "log metrics every N optimiser steps", min=1)
    save_every: int = option(0, "checkpoint every N optimiser steps (0 = only at the end)", min=0)
    keep_last: int = option(2, "checkpoints kept in output_dir/checkpoints, newest first (0 = all)", min=0)
    resume: bool = option(False, "continue from the latest checkpoint in output_dir")
    max_skipped_steps: int = option(3, "stop when this many optimiser steps in a row had a non-finite loss or "
                                       "gradient (each is skipped, the optimiser untouched)", min=1)
    collapse_steps: int = option(10, "warn when the gradient norm is 0, or the entropy sits at log(vocab), "
                                     "this many logged steps in a row", min=1)

    def __post_init__(self):
        check_fields(self)
        check_divides(self.batch_size, self.micro_batch_size, "batch_size / micro_batch_size")
        if self.lora_r > 0 and self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be > 0 with LoRA, got {self.lora_alpha}")

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size

    def check_world(self, world: distributed.World) -> None:
        """Under torchrun, batch_size is global: every rank must get whole micro-batches of it, so
        that the ranks together make exactly the micro-batches one process would."""
        if world.size > 1:
            check_divides(self.batch_size, self.micro_batch_size * world.size,
                          f"batch_size / (micro_batch_size x {world.size} ranks)")

    def run_settings(self) -> dict:
        """The fields that define a run: resuming with any of them changed is an error. What only
        says where, how often to log and save, or how to react, may change between sessions. A
        run on several ranks adds its world size: resuming it on another number is an error."""
        settings = {k: v for k, v in asdict(self).items() if k not in RESUMABLE_CHANGES}
        world = distributed.current()
        if world.size > 1:
            settings["world_size"] = world.size
        return settings

    @classmethod
    def settings_before_options(cls) -> dict:
        """For each config field, the value a checkpoint written before the option existed stands
        for: its `before` (option()), else its default (an option whose default keeps the old
        behaviour). A checkpoint without a setting resumes when this run's value is that one."""
        before = {}
        for field in fields(cls):
            if "before" in field.metadata:
                before[field.name] = field.metadata["before"]
            elif field.default is not MISSING:
                before[field.name] = field.default
            elif field.default_factory is not MISSING:
                before[field.name] = field.default_factory()
        return before


# fields a resumed session may change
RESUMABLE_CHANGES = frozenset({"output_dir", "overwrite", "resume", "device", "log_every", "save_every",
                               "keep_last", "max_skipped_steps", "collapse_steps"})
