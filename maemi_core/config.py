"""Configuration profiles (``configs/*.yaml``), selected by the ``MAEMI_CONFIG`` variable.

Relative paths in a profile (``workdir``, ``dataset.root`` ...) are resolved against the
project root: ``MAEMI_ROOT`` when set, otherwise the folder that holds ``configs/`` when the
profile lives there, otherwise the profile's own folder. That keeps ``make demo``,
``dagster dev`` and a notebook pointing at the same files whatever their working directory.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = "configs/default.yaml"
CONFIG_ENV = "MAEMI_CONFIG"


class ConfigError(ValueError):
    """A profile is missing or malformed; the message says what to change."""


class _Strict(BaseModel):
    # A typo in a YAML key must fail loudly instead of silently using a default.
    model_config = ConfigDict(extra="forbid")


class SplitConfig(_Strict):
    train: float = 0.7
    val: float = 0.1
    test: float = 0.2

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        fractions = (self.train, self.val, self.test)
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(
                f"dataset.split fractions must be >= 0 and sum to 1, got train={self.train} "
                f"val={self.val} test={self.test}"
            )
        return self


class DatasetConfig(_Strict):
    name: str
    kind: Literal["elpv", "imagefolder"]
    root: Optional[str] = None
    test_root: Optional[str] = None
    prompt_pack: str
    private: bool = True
    split: SplitConfig = Field(default_factory=SplitConfig)
    # Take at most this many images per class (chosen by hash, so the slice is stable);
    # used by the tiny profile for tests and CI.
    max_per_class: Optional[int] = None
    # Detect and crop the instrument data bar along the bottom of SEM images.
    crop_databar: bool = False
    # Pixel size for every image when the files do not carry it in their TIFF tags.
    pixel_size_nm: Optional[float] = None
    # Sample groups (maemi_core/data/sample_groups.py): a regular expression on the path below the
    # root whose first group names the sample; all images of a sample share a split. null: none.
    # auto: no names; shifted, cropped, rotated and mirrored copies of one image are found by their
    # pixels (maemi_core/data/near_copies.py) and grouped.
    group_by: Optional[str] = None
    # With test_root: images in root of a sample that is also in the test set are reported; true
    # removes them from train/val (rejected as same_sample_as_test).
    drop_test_samples_from_training: bool = False
    # Asset-check bounds.
    max_rejected_fraction: float = 0.05
    max_imbalance_ratio: float = 20.0
    max_group_fraction: float = 0.5      # warn when one sample holds more of a class than this

    @model_validator(mode="after")
    def _root_for_imagefolder(self) -> "DatasetConfig":
        if self.kind == "imagefolder" and not self.root:
            raise ValueError(
                "dataset.kind is 'imagefolder' but dataset.root is empty: set it to a folder "
                "laid out as <root>/<class>/<image files>"
            )
        if self.max_per_class is not None and self.max_per_class < 1:
            raise ValueError("dataset.max_per_class must be a positive integer or null")
        if self.group_by and self.group_by != "auto":
            import re

            try:
                re.compile(self.group_by)
            except re.error as exc:
                raise ValueError(f"dataset.group_by is not a valid regular expression ({exc}): give one whose "
                                 "first group names the sample, e.g. '^[^/]+/([^_]+)_'") from exc
        return self


class MlflowConfig(_Strict):
    # null: MLFLOW_TRACKING_URI if set, else the embedded sqlite store under mlflow/.
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None  # default: maemi-<dataset.name>


class ViTConfig(_Strict):
    """The paper's ViT (A.5, A.8): 224 px, 32 px patches, embedding 64, 4 heads of width 32.
    Depth and MLP width are not given in the paper; 8 layers with a 128-wide MLP follow the
    Keras ViT recipe the paper's numbers match."""
    patch_size: int = 32
    dim: int = 64
    depth: int = 8
    heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 128
    dropout: float = 0.1


class ClassifierTrainingConfig(_Strict):
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_epochs: int = 50
    early_stopping_patience: int = 10   # epochs without a better val loss before stopping
    lr_patience: int = 5                # epochs without a better val loss before halving the lr
    lr_factor: float = 0.5
    label_smoothing: float = 0.0
    augment: bool = True
    class_weighting: bool = True        # inverse-frequency weights against imbalance
    seed: int = 0


class VisionConfig(_Strict):
    # Which encoder feeds image_embeddings, demonstration sampling and (later) the VLM.
    encoder: Literal["vit", "efficientnet_lite0"] = "vit"
    image_size: int = 224
    vit: ViTConfig = Field(default_factory=ViTConfig)
    train: ClassifierTrainingConfig = Field(default_factory=ClassifierTrainingConfig)
    # Rows beside the ViT. efficientnet_lite0: frozen encoder + logistic-regression probe on the
    # whole image at 224 px; efficientnet_lite0_tiles: the same plus the mean feature of 224-px
    # tiles at each of tile_scales (for micrographs much larger than 224 px); efficientnet_lite0_tta:
    # the first probe with its scores averaged over the 8 rotations/flips; efficientnet_lite0_finetune:
    # the last finetune_blocks blocks + head conv + a linear classifier trained (finetune_train) on
    # cached trunk maps; classical: texture SVM.
    baselines: list[Literal["efficientnet_lite0", "efficientnet_lite0_tiles", "efficientnet_lite0_tta",
                            "efficientnet_lite0_finetune", "classical"]] = Field(
        default_factory=lambda: ["efficientnet_lite0", "classical"])
    finetune_blocks: int = Field(3, ge=1, le=16)
    finetune_train: ClassifierTrainingConfig = Field(default_factory=lambda: ClassifierTrainingConfig(
        lr=3e-4, max_epochs=30, early_stopping_patience=6, lr_patience=3))
    tile_scales: list[int] = Field(default_factory=lambda: [2])   # short side = s x image_size
    embed_batch_size: int = 64
    # Probe / SVM C: chosen by cross-validation over train+val with folds that never split a
    # sample group when the validation split has fewer images than this; else on validation.
    grouped_cv_below: int = 200
    # The classical baseline's feature blocks (lbp, glcm, hog, intensity): the candidate sets that
    # validation (or grouped CV) chooses from together with C; null: the texture core with and
    # without HOG / intensity statistics, and LBP or GLCM alone. One set fixes it.
    classical_feature_sets: Optional[list[list[Literal["lbp", "glcm", "hog", "intensity"]]]] = None


class SamplingConfig(_Strict):
    k_shot: int = 4            # few-shot demonstrations per target image
    group_size: int = 3        # images per inter/intra/heterogeneity group
    groups_per_split: int = 40  # groups of each kind built within each split
    chunk_size: int = 2048     # rows of the similarity matrix computed at once


TEACHER_TASKS = ("caption", "vqa", "classify_zero_shot", "classify_few_shot",
                 "intra_dissimilar", "inter_similar", "heterogeneity")


class TeacherConfig(_Strict):
    """Who writes the instruction data. ``measurement``: the on-prem teacher that answers from
    scikit-image measurements (no model, no network). ``openai``: any OpenAI-compatible
    chat-completions endpoint (api.openai.com, or vLLM / Ollama / TGI on premises)."""
    kind: Literal["measurement", "openai"] = "measurement"
    base_url: Optional[str] = None
    model: Optional[str] = None
    api_key_env: str = "MAEMI_TEACHER_API_KEY"   # the key itself only ever lives in this variable
    max_tokens: int = 400
    temperature: float = 0.2
    detail: Literal["low", "high", "auto"] = "low"
    concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 6             # transport retries (429, 5xx, timeouts) per request
    max_answer_retries: int = 2      # retries of an empty or refused answer
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    price_input_per_mtok: float = 0.0    # currency units per million prompt tokens, for cost accounting
    price_output_per_mtok: float = 0.0
    allow_external_teacher: bool = False  # required to send a private dataset off this host
    on_prem_hosts: list[str] = Field(default_factory=list)  # extra hosts that count as on premises
    tasks: list[Literal["caption", "vqa", "classify_zero_shot", "classify_few_shot",
                        "intra_dissimilar", "inter_similar", "heterogeneity"]] = Field(
        default_factory=lambda: list(TEACHER_TASKS))
    vqa_questions_per_image: Optional[int] = 3   # null: every question of the pack for every image
    # instruction_set fails its blocking check when more than this fraction of any split's records
    # could not be answered by the teacher (after retries)
    max_failed_fraction: float = 0.01
    # Paper A.7: a concise and a detailed answer to the same question for these tasks (the student
    # prompt says which length it wants); [] keeps one detailed answer per question.
    concise_tasks: list[Literal["caption", "vqa", "classify_zero_shot", "classify_few_shot"]] = Field(
        default_factory=lambda: ["caption", "vqa", "classify_zero_shot", "classify_few_shot"])
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train", "val", "test"])
    # The manifest columns the teacher states as recorded metadata (fact key `metadata`), to either
    # teacher: only what the acquisition recorded about an image. Label and pixel size are stated by
    # their own facts; ids, hashes, paths, splits and sample groups never are. Absent columns are skipped.
    acquisition_metadata: list[str] = Field(default_factory=lambda: [
        "cell_type", "instrument", "detector", "magnification", "accelerating_voltage", "working_distance"])

    @model_validator(mode="after")
    def _openai_needs_endpoint(self) -> "TeacherConfig":
        if self.kind == "openai" and (not self.base_url or not self.model):
            raise ValueError("teacher.kind 'openai' needs teacher.base_url and teacher.model")
        return self


class TrainBudget(_Strict):
    """How much the MAEMI model trains: exactly one of ``tokens`` (prompt + answer tokens of the
    examples stepped through: the same on every machine), ``minutes`` (optimizer-step wall time)
    or ``epochs`` (passes over the train examples, fractions allowed). The learning rate follows
    warmup-stable-decay: linear warmup over ``warmup_steps``, constant, then linear to 0 over the
    last ``decay_fraction`` of the budget; the final weights are the model."""
    tokens: Optional[int] = Field(None, gt=0)
    minutes: Optional[float] = Field(None, gt=0)
    epochs: Optional[float] = Field(None, gt=0)
    decay_fraction: float = Field(0.25, ge=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0)
    eval_points: int = Field(4, ge=1)              # validation loss (and a checkpoint) at this many even points
    checkpoint_minutes: float = Field(5.0, ge=0.0)  # also a checkpoint after this much training time (0: every step)

    @model_validator(mode="after")
    def _one_unit(self) -> "TrainBudget":
        given = [k for k in ("tokens", "minutes", "epochs") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a training budget names exactly one of tokens, minutes or epochs, e.g. "
                             f"{{tokens: 800000, decay_fraction: 0.25}}; got {given or 'none'}")
        return self

    @property
    def unit(self) -> str:
        return next(k for k in ("tokens", "minutes", "epochs") if getattr(self, k) is not None)

    @property
    def amount(self) -> float:
        return float(getattr(self, self.unit))


class ModelConfig(_Strict):
    """The vision-language model (paper Figure 2, A.1, A.8) and its instruction tuning."""
    lm_profile: Literal["default", "tiny", "paper"] = "default"
    lm_path: Optional[str] = None          # paper profile: a local Hugging Face folder
    lm_cache: Optional[str] = None         # converted LM weights; null: $MAEMI_LM_CACHE or ~/.cache/maemi/lm
    xattn_every: int = 2
    xattn_heads: int = 4         # paper A.8
    xattn_head_dim: int = 32
    xattn_ff_mult: int = 2
    media_norm: bool = False     # layer-normalise the visual tokens first (measured worse on ELPV: README)
    # standardise every visual-token channel with its mean/std over the train images (fitted once
    # before the first step, kept with the trained tensors): what the linear probe's scaler does
    media_standardize: bool = False
    r_min: int = 4
    r_max: int = 16
    alpha: float = 16.0
    lora_dropout: float = 0.05
    quantize_8bit: bool = True
    # The frozen base's matmuls in training: bfloat16 multiplies the exact int8 values with the
    # activations and products rounded to bf16 (about 4x fp32's speed where the CPU has AVX512-BF16/AMX);
    # auto: bfloat16 where the machine multiplies bf16 natively, else float32. Serving is fp32.
    train_matmul_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # training
    lr: float = 1e-3
    gate_lr_multiplier: float = 1.0       # the cross-attention gates learn this many times faster
    micro_batch: int = 4
    effective_batch: int = 32
    # How long ``maemi_model`` trains (tokens, minutes or epochs) and the warmup-stable-decay
    # schedule; ``retune_budget``: the same for a re-tune that warm-starts from the champion
    # (null: train_budget).
    train_budget: TrainBudget = Field(default_factory=lambda: TrainBudget(epochs=50))
    retune_budget: Optional[TrainBudget] = None
    max_len: int = 256
    train_tasks: list[str] = Field(default_factory=lambda: list(TEACHER_TASKS))
    # null: every train record of train_tasks, streamed epoch after epoch until the budget is spent;
    # a number: a stable hash-chosen slice of that many records
    max_train_records: Optional[int] = None
    # Records of a task per round-robin round of the slice (default 1); with max_train_records
    # null (the stream), how many times each record of a task appears per epoch (oversampling).
    train_task_weights: dict[str, int] = Field(default_factory=dict)
    # With the stream: the k-th copy of a record of a task shows its images in the task's k-th view
    # (cyclically): none, hflip, vflip or rot180 (maemi_core/data/transforms.py). Only for tasks
    # whose answers do not depend on orientation (a category is; a caption's "left" is not).
    train_task_views: dict[str, list[Literal["none", "hflip", "vflip", "rot180"]]] = Field(default_factory=dict)
    max_val_records: Optional[int] = None
    seed: int = 0
    # Data-parallel tuning on this many processes (torchrun; gloo on CPU, nccl with one GPU per
    # process): the effective batch is split across them, gradients summed. 1: in the step's process.
    processes: int = Field(1, ge=1)
    # Large tensors mmap-ed and returned when freed: training peak RSS 0.59x of peft LoRA's instead
    # of 0.69x (glibc keeps freed activations), at about 40% more time per step on CPU.
    low_memory_allocator: bool = False
    # generation
    max_new_tokens: int = 96
    # auto: serve with a faster numerics (the dynamic int8 kernel, else bf16 matmuls on the int8
    # weights where the CPU multiplies bf16 natively) only if, on the validation records, it gives
    # the same greedy answers and loss as the training numerics in fp32 (weight_only_int8);
    # maemi_core/model/inference_kernel.py
    inference_kernel: Literal["auto", "dynamic_int8", "weight_only_int8_bf16", "weight_only_int8"] = "auto"
    # Served in the training numerics, every adapted layer keeps a merged fp32 weight per deployment
    # rank a request asks for: at most this many (least recently used dropped; each costs about the
    # LM's size in fp32). Travels in the package.
    served_rank_cache: int = Field(2, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _epoch_keys_replaced(cls, data):
        if isinstance(data, dict):
            old = [k for k in ("max_epochs", "early_stopping_patience", "lr_patience") if k in data]
            if old:
                raise ValueError(f"model.{old[0]} is no longer read: the MAEMI model trains for model.train_budget "
                                 "(e.g. {epochs: 2}, {tokens: 800000} or {minutes: 120}) with a warmup-stable-decay "
                                 "schedule and keeps its final weights; replace " + ", ".join(f"model.{k}" for k in old))
        return data

    @model_validator(mode="after")
    def _task_weights_name_tasks(self) -> "ModelConfig":
        bad = {k: v for k, v in self.train_task_weights.items() if k not in TEACHER_TASKS or v < 0}
        if bad:
            raise ValueError(f"model.train_task_weights {bad}: keys are tasks of {list(TEACHER_TASKS)}, "
                             "values copies per epoch of the stream or records per round of a slice (>= 0)")
        untrained = sorted(set(self.train_task_weights) - set(self.train_tasks))
        if untrained:
            raise ValueError(f"model.train_task_weights weights {untrained}, which model.train_tasks "
                             f"{self.train_tasks} does not train: a weight there would do nothing; add the task to "
                             "model.train_tasks or remove its weight")
        odd = sorted(k for k, v in self.train_task_views.items() if k not in self.train_tasks or not v)
        if odd:
            raise ValueError(f"model.train_task_views {odd}: keys are tasks of model.train_tasks {self.train_tasks}, "
                             "each with a non-empty list of views (none, hflip, vflip, rot180)")
        if self.train_task_views and self.max_train_records is not None:
            raise ValueError("model.train_task_views shows a record's copies in other views, and only the stream "
                             "(model.max_train_records: null) copies records: set max_train_records to null or "
                             "remove train_task_views")
        return self


class BaselineEndpoint(_Strict):
    """A vision-language model served behind an OpenAI-compatible endpoint (e.g. LLaVA,
    InstructBLIP or MiniGPT-4 under vLLM on premises), evaluated on the same test records."""
    name: str
    base_url: str
    model: str
    api_key_env: Optional[str] = None      # the key only ever lives in this environment variable
    max_tokens: int = 256
    temperature: float = 0.0
    timeout_s: float = 120.0
    allow_external: bool = False           # required to send a private dataset's images off this host
    on_prem_hosts: list[str] = Field(default_factory=list)


class EvaluationConfig(_Strict):
    """``benchmark_tables``: the paper's evaluation on the held-out test split."""
    max_records_per_task: Optional[int] = 16   # a stable hash slice of each task's test records; null: all
    # The group tables (Tables 4-6: 3-5 images and a long answer per record) cost several times a
    # one-image record; null: max_records_per_task.
    max_group_records_per_task: Optional[int] = None
    batch_size: int = 8                        # prompts decoded together
    classification_max_new_tokens: int = 24    # the category comes first in a classification answer
    rank_sweep: Optional[list[int]] = None     # deploy ranks to compare; null: r_min, the middle, r_max
    rank_sweep_records: Optional[int] = 8      # VQA records per rank in the sweep
    # Classification: every model scores the same test images by likelihood; null: every test image.
    classification_max_images: Optional[int] = None
    # How category likelihoods are compared (maemi_core/model/category_scoring.py): auto chooses among
    # raw, mean (length-normalised), calibrated (content-free image subtracted) and fitted (matrix
    # scaling fitted on validation images) and head (a logistic regression on the tuned model's hidden
    # state at the answer, fitted on train images) by validation log-loss after training; the choice
    # and the fitted weights travel with the model. The benchmark reports every scoring.
    category_scoring: Literal["auto", "raw", "mean", "calibrated", "fitted", "head"] = "auto"
    scoring_val_images: Optional[int] = Field(None, ge=2)   # validation images that choose it; null: all
    head_train_images: Optional[int] = Field(None, ge=0)    # train prompts head is fitted on; null: all, 0: no head
    # Decoding controls, the same for every method of a table (greedy decoding repeats sentences).
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    no_vision_baseline: bool = True            # the base LM with gates closed and no adapters
    baselines: list[BaselineEndpoint] = Field(default_factory=list)
    qualitative_samples: int = 6

    @model_validator(mode="after")
    def _head_needs_train_prompts(self) -> "EvaluationConfig":
        if self.category_scoring == "head" and self.head_train_images == 0:
            raise ValueError("evaluation.category_scoring is head, but evaluation.head_train_images is 0 (no head "
                             "is fitted): set head_train_images to null (every train prompt) or a count, or choose "
                             "another scoring")
        return self


class OperationsConfig(_Strict):
    """Day-to-day re-tuning: the fab's drop folder, the sensor that watches it, the schedule."""
    incoming_dir: Optional[str] = None     # null: <workdir>/incoming; batches as <batch>/<class>/<files>
    complete_marker: str = "_COMPLETE"     # a batch with this file is complete...
    quiet_period_s: Optional[float] = 600  # ...or once nothing in it changed for this long (null: marker only)
    sensor_interval_s: int = 30
    retune_cron: str = "0 3 * * 1"         # weekly, Monday 03:00
    timezone: str = "UTC"
    warm_start_from_champion: bool = True  # re-tuning continues from the champion's adapters
    # Torch steps that can run at once on this host under the Dagster instance's settings (pool
    # maemi_torch, deploy/dagster.yaml): each takes cores // this many threads.
    torch_steps_at_once: int = Field(1, ge=1)
    keep_runs: int = Field(3, ge=1)         # completed copies of each stage kept under <workdir>/runs
    # Many hosts: the environment variable holding the shared PostgreSQL URL (teacher cache,
    # promotion lock; maemi_core/shared_database.py). Unset variable: single-host sqlite + fcntl.
    shared_database_env: str = "MAEMI_SHARED_DATABASE_URL"


# The per-record metrics the benchmark stores (reports/samples/key_scores.csv): what promotion can
# compare. Text tables x text metrics (maemi_core/evaluation/benchmark_tables.py TEXT_TABLES,
# text_metrics.METRICS; a test keeps the lists in step) and the classification scores.
KEY_METRIC_NAMES = tuple(
    [f"{t}.{m}" for t in ("captioning", "vqa", "vqa_intra_dissimilar", "vqa_inter_similar", "vqa_heterogeneity")
     for m in ("bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor")]
    + ["classification.zero_shot_top1", "classification.few_shot_top1", "classification.zero_shot_balanced_accuracy"])


class PromotionConfig(_Strict):
    """When a challenger may become champion (maemi_core/registry/model_promotion.py): for every
    key metric, paired on the same benchmark records, the interval of challenger - champion (and
    - reference, the best champion so far) lies above -margin; a first version must beat base_lm."""
    key_metrics: dict[str, float] = Field(default_factory=lambda: {
        "classification.zero_shot_top1": 0.05, "vqa.meteor": 0.04, "vqa.rougeL": 0.04})
    confidence: float = Field(0.95, gt=0.5, lt=1.0)   # two-sided level of the bootstrap interval
    first_must_beat_base_lm: bool = True                # off only for smoke profiles with a random LM
    # Fewer paired records than this for a key metric: the interval says too little, promotion refuses.
    min_records: int = Field(20, ge=2)
    # Every promotion, the first included, also needs the challenger to use the image: on its own
    # benchmark records it beats maemi_gates_closed (the same weights without the image) and
    # base_lm on every key text metric (interval above 0), and the majority class on zero-shot
    # balanced accuracy (paired interval above 0) or macro AUC (interval above 0.5). Off only for
    # smoke profiles with a random LM.
    require_grounding: bool = True

    @field_validator("key_metrics")
    @classmethod
    def _known_metrics(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(KEY_METRIC_NAMES))
        if unknown:
            raise ValueError(f"promotion.key_metrics {unknown}: not a metric the benchmark stores per record; "
                             f"choose from {sorted(KEY_METRIC_NAMES)}")
        if not value:
            raise ValueError("promotion.key_metrics is empty: name at least one metric and its margin")
        if any(m < 0 for m in value.values()):
            raise ValueError("promotion.key_metrics margins are absolute differences >= 0")
        return value


class PaperBaselinesConfig(_Strict):
    # The paper's Tables 7 and 8 (job paper_baselines; maemi_core/vision/paper_baselines/): every
    # row trains from scratch on the manifest's splits under the same budget.
    image_size: int = 96                # the rows' input size (the pipeline's vision models read 224)
    model_size: Literal["default", "tiny"] = "default"   # each row's widths and depths (zoo.py); tiny: tests
    epochs: int = 30                    # per row; training stops at epochs or minutes, whichever comes first
    minutes: float = 3.0                # per row, wall time on this profile's machine
    batch_size: int = 32
    lr: float = 1e-3                    # AdamW (weight decay 0.05) for supervised rows and pretraining
    graph_grid: int = 8                 # Table 8: each image as a graph of grid x grid patches
    graph_hidden: int = 64
    graph_layers: int = 3
    seed: int = 0


class MaemiConfig(_Strict):
    dataset: DatasetConfig
    workdir: str
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    vision: VisionConfig = Field(default_factory=VisionConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    operations: OperationsConfig = Field(default_factory=OperationsConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    paper_baselines: PaperBaselinesConfig = Field(default_factory=PaperBaselinesConfig)

    # Filled in by load_config, not read from YAML.
    config_name: str = ""
    config_path: str = ""
    project_root: str = ""
    # Set by maemi_core.run_isolation.scoped for a pipeline step: whose stage folders it uses.
    _run_scope: Optional[str] = PrivateAttr(default=None)
    _writing_stage: Optional[str] = PrivateAttr(default=None)
    _write_dir: Optional[str] = PrivateAttr(default=None)      # the folder this step writes, once chosen

    @model_validator(mode="after")
    def _promotion_has_what_it_compares(self) -> "MaemiConfig":
        p = self.promotion
        if not self.evaluation.no_vision_baseline and (p.first_must_beat_base_lm or p.require_grounding):
            needs = [k for k in ("first_must_beat_base_lm", "require_grounding") if getattr(p, k)]
            raise ValueError(f"evaluation.no_vision_baseline is off, but promotion.{needs[0]} compares the challenger "
                             "with base_lm / maemi_gates_closed, which only that baseline measures: turn "
                             "evaluation.no_vision_baseline on, or set " + " and ".join(f"promotion.{k}: false"
                                                                                       for k in needs))
        return self

    def resolve(self, path: str | os.PathLike) -> Path:
        """An absolute path for a (possibly relative) path from the profile."""
        p = Path(os.path.expanduser(str(path)))
        return p if p.is_absolute() else Path(self.project_root) / p

    @property
    def workdir_path(self) -> Path:
        return self.resolve(self.workdir)

    @property
    def incoming_path(self) -> Path:
        o = self.operations.incoming_dir
        return self.resolve(o) if o else self.workdir_path / "incoming"

    @property
    def experiment_name(self) -> str:
        return self.mlflow.experiment or f"maemi-{self.dataset.name}"

    def fingerprint(self) -> str:
        """Short hash of the effective settings (paths excluded), for run tags."""
        payload = self.model_dump(exclude={"config_path", "project_root"})
        return hashlib.sha256(yaml.safe_dump(payload, sort_keys=True).encode()).hexdigest()[:12]


def _project_root_for(config_file: Path) -> Path:
    if os.environ.get("MAEMI_ROOT"):
        return Path(os.environ["MAEMI_ROOT"]).resolve()
    parent = config_file.parent
    return parent.parent if parent.name == "configs" else parent


def config_path_from_env() -> str:
    return os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::\?([^}]*))?\}")


def _expand_dataset_paths(data: dict, config_file: Path) -> None:
    """``dataset.root`` and ``dataset.test_root`` may name environment variables, for data kept
    outside the checkout: ``${VAR}``, or ``${VAR:?how to get it}`` whose text becomes the error
    when the variable is unset or empty."""
    ds = data.get("dataset")
    if not isinstance(ds, dict):
        return
    for key in ("root", "test_root"):
        value = ds.get(key)
        if not isinstance(value, str) or "${" not in value:
            continue

        def sub(m: re.Match) -> str:
            name, hint = m.group(1), m.group(2)
            if os.environ.get(name):
                return os.environ[name]
            raise ConfigError(f"{config_file}: dataset.{key} is ${{{name}}}, and {name} is not set"
                              + (f". {hint.strip()}" if hint and hint.strip() else
                                 ": set it to a folder laid out as <root>/<class>/<image files>"))

        ds[key] = _ENV_REF.sub(sub, value)


def load_config(path: str | os.PathLike | None = None) -> MaemiConfig:
    """Load and validate a profile; ``path`` defaults to ``$MAEMI_CONFIG`` or the default."""
    raw_path = Path(path if path is not None else config_path_from_env()).expanduser()
    config_file = raw_path.resolve()
    if not config_file.is_file() and not raw_path.is_absolute():
        # `dagster dev` or a notebook started elsewhere: fall back to the checkout's configs/.
        config_file = (Path(__file__).resolve().parents[1] / raw_path).resolve()
    if not config_file.is_file():
        raise ConfigError(
            f"config file {raw_path} not found. Set {CONFIG_ENV} to a profile such as "
            f"configs/default.yaml, configs/tiny.yaml or configs/sem.yaml."
        )
    try:
        data = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_file} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{config_file} must hold a YAML mapping at the top level")
    _expand_dataset_paths(data, config_file)
    try:
        cfg = MaemiConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"{config_file} is not a valid MAEMI profile:\n{exc}") from exc
    cfg.config_name = config_file.stem
    cfg.config_path = str(config_file)
    cfg.project_root = str(_project_root_for(config_file))
    return cfg
